"""The regularizer checks: every layer type, finite gradients, state in ``state_dict``, exact
resume, eval mode and ``frozen_state``, once per optimizer step, determinism, and 2 gloo
processes (slow; the child is :mod:`core.testing.ddp`). The penalty's own checks (contract v2:
``penalty``, ``needs``, ``penalty_every``, the regularizer's ``state_dict``) are in
:mod:`core.testing.penalties`. The training checks run the real :class:`core.train.Trainer` with
the built-in ``resnet32``, ``stacked_digits`` and ``hinge``.

A penalty is called as the loop calls it: with a :class:`core.interfaces.StepContext` of a D step
(:func:`core.testing.steps.discriminator_context`) or, for a regularizer applied to G, of a G step;
a v1 plugin's ``loss_term`` is reached through the default ``penalty``."""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.layers import LAYER_TYPES, frozen_state, raw_weight, weight_layers
from core.testing.ddp import ddp_run
from core.testing.kit import (SEED, Case, conformance_check, differences, fail,
                              registered, small_architecture, small_discriminator, state_of)
from core.testing.steps import (checked_every, checked_penalty, d_regularizers,
                                discriminator_context, generator_context, kit_optimizer,
                                objective, optimizer_step, random_images, regularized,
                                small_trainer, trainer_recipe, trainer_state)


@conformance_check("regularizers", covers=("apply", "penalty", "loss_term", "after_step"))
def check_regularizer_applies_to_every_layer_type(case: Case) -> None:
    """``apply`` returns the module with its layers, and every Conv2d, Linear and Embedding is
    regularized: parametrized, in the penalty's autograd graph, or changed by ``after_step``."""
    torch.manual_seed(SEED)
    module = small_discriminator(num_classes=4)
    before = [name for name, _ in weight_layers(module)]
    reg = case.create()
    out = reg.apply(module)
    if not isinstance(out, nn.Module):
        fail(case, f"apply must return the module, got {type(out).__name__}")
    layers = dict(weight_layers(out))
    lost = [n for n in before if n not in layers]
    if lost:
        fail(case, f"apply removed or replaced layers: {lost}")
    touched = {n for n, layer in layers.items() if parametrize.is_parametrized(layer, "weight")}
    context, _ = discriminator_context(reg, out, *random_images(4, torch.Generator().manual_seed(SEED)))
    term = checked_penalty(case, reg, context)
    rest = [n for n in layers if n not in touched]
    if term is not None and rest:
        grads = torch.autograd.grad(term, [raw_weight(layers[n]) for n in rest], allow_unused=True)
        touched |= {n for n, g in zip(rest, grads) if g is not None}
    rest = [n for n in layers if n not in touched]
    if rest:
        old = {n: raw_weight(layers[n]).detach().clone() for n in rest}
        with torch.no_grad():
            reg.after_step(out, 0)
        touched |= {n for n in rest if not torch.equal(old[n], raw_weight(layers[n]))}
    untouched = {}
    for n, layer in layers.items():
        if n not in touched:
            kind = next(k for k, t in LAYER_TYPES.items() if isinstance(layer, t))
            untouched.setdefault(kind, []).append(n)
    if untouched:
        fail(case, "layers left unregularized (SPEC §2: every Conv2d, Linear and Embedding): "
                   + "; ".join(f"{k}: {', '.join(v)}" for k, v in untouched.items()))


@conformance_check("regularizers", covers=("apply", "penalty", "loss_term", "after_step"))
def check_regularizer_finite_outputs_and_gradients(case: Case) -> None:
    """On a regularized D (and G): finite outputs in train and eval mode, a finite gradient for
    every parameter, a finite penalty that has a gradient (in D's step, and in G's when applied
    to G), finite weights after ``after_step``."""
    reg, D = regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    x, y = random_images(6, rng)
    context, logits = discriminator_context(reg, D, x, y)
    if logits.shape != (6,) or not torch.isfinite(logits).all():
        fail(case, f"the regularized D gives logits {tuple(logits.shape)} with non-finite "
                   f"values or the wrong shape (expected (6,))")
    loss = objective(logits)
    term = checked_penalty(case, reg, context)
    if term is not None:
        if not term.requires_grad:
            fail(case, "penalty returned a tensor without a gradient (a constant penalty "
                       "does nothing; return None instead)")
        loss = loss + term
    loss.backward()
    bad = [n for n, p in D.named_parameters() if p.requires_grad and
           (p.grad is None or not torch.isfinite(p.grad).all())]
    if bad:
        fail(case, f"parameters without a finite gradient: {bad[:8]}")
    with torch.no_grad():
        reg.after_step(D, 0)
        D.eval()
        if not torch.isfinite(D(x, y)).all():
            fail(case, "non-finite eval-mode logits after after_step")
    bad = [n for n, p in D.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        fail(case, f"after_step left non-finite parameters: {bad[:8]}")
    # the generator too: regularizers may be applied to G (SN on ImageNet's G, orthogonal reg.)
    torch.manual_seed(SEED)
    arch = small_architecture(num_classes=4)
    reg_g = case.create()
    G = reg_g.apply(arch.build_generator())
    z, yz = arch.sample_latents(4, torch.Generator().manual_seed(1))
    context = generator_context(G, small_discriminator(num_classes=4), z, yz)
    images = context.fake
    loss = images.square().mean()
    term = checked_penalty(case, reg_g, context)
    if term is not None:
        loss = loss + term
    loss.backward()
    bad = [n for n, p in G.named_parameters() if p.requires_grad and
           (p.grad is None or not torch.isfinite(p.grad).all())]
    if not torch.isfinite(images).all() or bad:
        fail(case, f"the regularized generator gives non-finite images or parameters without "
                   f"a finite gradient: {bad[:8]}")


@conformance_check("regularizers", covers=("apply", "state_dict", "load_state_dict"))
def check_regularizer_state_dict_round_trip(case: Case) -> None:
    """All regularizer state lives in the network's ``state_dict()`` (tensors only,
    safetensors-ready) or the regularizer's own ``state_dict()``: loaded into a fresh regularized
    D (and a fresh regularizer) it gives the same outputs and the same next training step."""
    from safetensors.torch import load, save

    reg1, D1 = regularized(case, seed=SEED)
    rng = torch.Generator().manual_seed(SEED)
    opt1 = kit_optimizer(D1)
    for it in range(2):
        optimizer_step(case, reg1, D1, opt1, [random_images(4, rng)], it)
    state = D1.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        fail(case, f"state_dict holds non-tensor entries (checkpoints are safetensors): "
                   f"{not_tensors}")
    state = load(save({k: v.detach().clone().contiguous() for k, v in state.items()}))
    reg2, D2 = regularized(case, seed=SEED + 1)  # other initial weights and state
    reg2.load_state_dict({k: v.detach().clone() for k, v in reg1.state_dict().items()})
    try:
        D2.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        fail(case, f"the state_dict of a trained regularized D does not load into a freshly "
                   f"regularized one (state created lazily, or shapes that change?): {exc}")
    diff = differences(state_of(D1), state_of(D2))
    if diff:
        fail(case, f"state differs after loading: {diff[:5]}")
    x, y = random_images(4, rng)
    D1.eval(), D2.eval()
    with torch.no_grad():
        if not torch.equal(D1(x, y), D2(x, y)):
            fail(case, "eval outputs differ after loading the state_dict")
    D1.train(), D2.train()
    batch = [random_images(4, rng)]
    optimizer_step(case, reg1, D1, kit_optimizer(D1), batch, 2)
    optimizer_step(case, reg2, D2, kit_optimizer(D2), batch, 2)
    diff = differences(state_of(D1), state_of(D2))
    if diff:
        fail(case, f"the next training step differs between the original and the reloaded D "
                   f"(state kept outside both state_dicts, e.g. in a Python attribute of the "
                   f"regularizer?): {diff[:5]}")


class _Stop(Exception):
    pass


@conformance_check("regularizers", covers=("apply", "after_step", "penalty", "loss_term",
                                           "state_dict", "load_state_dict"))
def check_regularizer_checkpoint_resume(case: Case) -> None:
    """A training run (the real Trainer) interrupted and resumed from its checkpoint ends
    bit-identical to a straight run: weights, regularizer state (the network's and the
    regularizer's own ``state_dict``), optimizer moments."""
    from core import checkpoint as ckpt
    from core.train import TrainingCallback

    class Interrupt(TrainingCallback):
        def on_iteration_end(self, trainer, iteration):
            if iteration == 3:
                raise _Stop

    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        recipe = trainer_recipe(name, case.create().config)
        straight = small_trainer(recipe, Path(tmp) / "straight")
        straight.fit()
        first = small_trainer(recipe, Path(tmp) / "resumed", [Interrupt()])
        with contextlib.suppress(_Stop):
            first.fit()
        first.log.close()  # fit closes its log only when it ends normally
        second = small_trainer(recipe, Path(tmp) / "resumed")
        second.resume(ckpt.resolve_checkpoint(Path(tmp) / "resumed"))
        second.fit()
        diff = differences(trainer_state(straight), trainer_state(second))
        if diff:
            fail(case, f"a run resumed from its iteration-2 checkpoint differs from a straight "
                       f"run after 4 iterations: {diff[:5]}")
        a, b = straight.opt_d.state_dict()["state"], second.opt_d.state_dict()["state"]
        if any(not torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a):
            fail(case, "D's optimizer moments differ between the resumed and the straight run")


@conformance_check("regularizers", covers=("apply", "penalty", "loss_term"))
def check_regularizer_eval_mode_changes_no_state(case: Case) -> None:
    """Eval-mode forwards (with or without gradients), the penalty, and training-mode forwards
    under :func:`core.layers.frozen_state` change no parameter or buffer."""
    reg, D = regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    x, y = random_images(4, rng)
    D(x, y)  # a first training forward: state created lazily exists from here on
    before = state_of(D)
    D.eval()
    with torch.no_grad():
        first = D(x, y)
        second = D(x, y)
    D(x, y).sum().backward()
    checked_penalty(case, reg, discriminator_context(reg, D, x, y)[0])
    diff = differences(before, state_of(D))
    if diff:
        fail(case, f"eval mode changed state: {diff[:5]}")
    if not torch.equal(first, second):
        fail(case, "two eval-mode forwards of the same input differ")
    D.train()
    with frozen_state():
        D(x, y).sum().backward()
        checked_penalty(case, reg, discriminator_context(reg, D, x, y)[0])
    diff = differences(before, state_of(D))
    if diff:
        fail(case, f"a training-mode forward under frozen_state() changed state (it must only "
                   f"update while core.layers.state_updates_enabled()): {diff[:5]}")


@conformance_check("regularizers", covers=("apply", "after_step", "penalty", "loss_term",
                                           "penalty_every"))
def check_regularizer_acts_once_per_optimizer_step(case: Case) -> None:
    """Two optimizer steps of 2 micro-batches of 4 equal two steps of one batch of 8 (in float64,
    so that rounding neither hides nor fakes a difference): state updated by the first
    micro-batch only, the penalty counted once per step, ``after_step`` once per step. In the
    real Trainer, ``after_step`` runs once per optimizer step and ``penalty`` once per
    micro-batch of the steps ``penalty_every`` selects."""
    results = []
    for k in (1, 2):
        reg, D = regularized(case)
        D = D.double()
        opt = kit_optimizer(D)
        rng = torch.Generator().manual_seed(SEED)
        grads = {}
        for it in range(2):
            x, y = random_images(8, rng)  # objective: first half "real", second half "fake"
            x = x.double()
            if k == 1:
                batches = [(x, y)]
            else:  # micro-batch i: real images 2i, 2i+1 and fake images 4+2i, 5+2i
                batches = [(torch.cat([x[2 * i:2 * i + 2], x[4 + 2 * i:6 + 2 * i]]),
                            torch.cat([y[2 * i:2 * i + 2], y[4 + 2 * i:6 + 2 * i]]))
                           for i in range(2)]
            optimizer_step(case, reg, D, opt, batches, it)
            if it == 0:
                grads = {n: p.grad.detach().clone() for n, p in D.named_parameters()
                         if p.grad is not None}
        results.append((grads, state_of(D)))
    diff = differences(results[0][0], results[1][0], exact=False, rtol=1e-7, atol=1e-9)
    if diff:
        fail(case, f"gradients of one step differ between 1 batch of 8 and 2 micro-batches of "
                   f"4: {diff[:5]}")
    diff = differences(results[0][1], results[1][1], exact=False, rtol=1e-7, atol=1e-9)
    if diff:
        fail(case, f"state after 2 steps differs between 1 batch of 8 and 2 micro-batches of 4 "
                   f"(state updated per forward, or the penalty not per step?): {diff[:5]}")
    # the real training loop: n_critic = 2 D steps of 2 micro-batches each in one iteration
    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        recipe = trainer_recipe(name, case.create().config, iterations=1, n_critic=2,
                                micro_batch_size=4)
        run = small_trainer(recipe, Path(tmp) / "run")
        if run.plan.accumulation != 2:
            fail(case, f"expected 2 micro-batches per step, the plan has "
                       f"{run.plan.accumulation}")
        calls = {"after_step": 0, "penalty": 0}
        (reg,) = d_regularizers(run)
        every = checked_every(case, reg)
        expected = {"after_step": 2, "penalty": 2 * sum(s % every == 0 for s in (0, 1))}

        def counting(method):
            @functools.wraps(method)
            def wrapper(*args, **kwargs):
                calls[method.__name__] += 1
                return method(*args, **kwargs)
            return wrapper

        reg.after_step = counting(reg.after_step)
        reg.penalty = counting(reg.penalty)
        try:
            run.train_iteration()
        finally:
            run.log.close()
        if calls != expected:
            fail(case, f"in one iteration of 2 D steps x 2 micro-batches the Trainer called "
                       f"after_step {calls['after_step']} times (expected 2, once per optimizer "
                       f"step) and penalty {calls['penalty']} times (expected "
                       f"{expected['penalty']}: once per micro-batch of the steps s with "
                       f"s % penalty_every ({every}) == 0)")


@conformance_check("regularizers", covers=("apply", "after_step", "loss_term"))
def check_regularizer_deterministic_under_seed(case: Case) -> None:
    """The same seed gives bit-identical state and outputs (apply, training steps, eval)."""
    runs = []
    for _ in range(2):
        reg, D = regularized(case, seed=SEED)
        rng = torch.Generator().manual_seed(SEED)
        opt = kit_optimizer(D)
        for it in range(2):
            optimizer_step(case, reg, D, opt, [random_images(4, rng), random_images(4, rng)], it)
        D.eval()
        with torch.no_grad():
            out = D(*random_images(4, rng))
        runs.append(({**state_of(D), "__eval_output": out}))
    diff = differences(*runs)
    if diff:
        fail(case, f"two runs with the same seed differ: {diff[:5]}")


@conformance_check("regularizers", covers=("apply", "after_step", "penalty", "loss_term"),
                   slow=True)
def check_regularizer_consistent_across_processes(case: Case) -> None:
    """Under DDP on 2 gloo processes, each with its own data and random stream, parameters and
    regularizer state stay identical on both after 3 steps of 2 micro-batches (float64)."""
    diff, _ = ddp_run(case)
    if diff:
        fail(case, f"parameters/state differ between the 2 processes: {diff[:5]}")
