"""The checks of contract v2's penalties (:class:`core.interfaces.StepContext`): the penalty's
gradient reaches D, ``needs`` are known and suffice, lazy ``penalty_every`` scales as documented in
the real Trainer, k micro-batches with a penalty equal one batch in the real Trainer, the
regularizer's own ``state_dict`` round-trips, and 2 DDP processes equal one process (slow).

A regularizer without a penalty (``penalty`` returns None) passes them by returning None
consistently; its parametrizations and projections are checked by :mod:`core.testing.regularizers`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from core.layers import raw_weight, weight_layers
from core.testing.ddp import STEPS, WORLD, ddp_run, rank_batches
from core.testing.kit import (SEED, Case, conformance_check, differences, fail, registered,
                              state_of)
from core.testing.steps import (checked_every, checked_penalty, d_regularizers,
                                discriminator_context, kit_optimizer, objective, optimizer_step,
                                random_images, regularized, small_trainer, trainer_recipe)

#: what a regularizer may list in ``needs`` (core.interfaces.Regularizer.needs).
KNOWN_NEEDS = frozenset({"real_grad"})


@conformance_check("regularizers", covers=("penalty", "needs"))
def check_regularizer_penalty_reaches_discriminator(case: Case) -> None:
    """``needs`` is a set of known names (``"real_grad"``); the penalty of a D step is None or a
    finite scalar with a gradient, calls no backward itself (parameters' ``.grad`` untouched) and
    leaves the loop's graph usable (the main loss plus the penalty back-propagates); a penalty
    that depends on the batch reaches every weight (Conv2d, Linear, Embedding) of D with a finite,
    nonzero gradient (``create_graph=True``, no detached inputs). Biases are not required: R1 does
    not depend on D's output bias, nor, for a piecewise-linear D, on the others."""
    needs = case.cls.needs
    if not isinstance(needs, (set, frozenset)) or not all(isinstance(n, str) for n in needs):
        fail(case, f"needs must be a frozenset of names, got {needs!r}")
    unknown = sorted(set(needs) - KNOWN_NEEDS)
    if unknown:
        fail(case, f"needs lists {unknown}, which the training loop does not know (known: "
                   f"{sorted(KNOWN_NEEDS)})")
    reg, D = regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    x, y = random_images(8, rng)
    context, logits = discriminator_context(reg, D, x, y)
    term = checked_penalty(case, reg, context)
    touched = [n for n, p in D.named_parameters() if p.grad is not None]
    if touched:
        fail(case, f"the penalty filled parameters' .grad itself ({touched[:4]}): it must return "
                   f"its value and let the loop back-propagate it once, scaled like the loss")
    if term is None:
        return
    if not term.requires_grad:
        fail(case, "penalty returned a tensor without a gradient (return None instead)")
    other, _ = discriminator_context(reg, D, *random_images(8, rng))
    term2 = checked_penalty(case, reg, other)
    data_dependent = term2 is None or not torch.allclose(term.detach(), term2.detach(),
                                                         rtol=1e-6, atol=0)
    if data_dependent:
        weights = [(name or "(the module)", raw_weight(layer)) for name, layer in weight_layers(D)]
        grads = torch.autograd.grad(term, [w for _, w in weights], retain_graph=True,
                                    allow_unused=True)
        missing = [name for (name, _), g in zip(weights, grads)
                   if g is None or not torch.isfinite(g).all() or not bool(g.abs().sum() > 0)]
        if missing:
            fail(case, f"the penalty depends on the batch, yet its gradient is missing, zero or "
                       f"non-finite for D's weights {missing[:6]} (a gradient taken without "
                       f"create_graph=True, or detached inputs or logits?)")
    try:
        (objective(logits) + term).backward()
    except RuntimeError as exc:
        fail(case, f"the main loss plus the penalty does not back-propagate (the penalty freed "
                   f"or broke the graph of the loop's forward?): {exc}")
    bad = [n for n, p in D.named_parameters() if p.grad is not None and
           not torch.isfinite(p.grad).all()]
    if bad:
        fail(case, f"non-finite gradients of the main loss plus the penalty: {bad[:6]}")


@conformance_check("regularizers", covers=("state_dict", "load_state_dict"))
def check_regularizer_own_state_round_trip(case: Case) -> None:
    """The regularizer's own ``state_dict()`` (state that is not a parametrization buffer) holds
    tensors only, goes through safetensors, and ``load_state_dict`` of it into a fresh instance
    gives it back exactly; ``load_state_dict({})`` (a checkpoint written without it) works."""
    from safetensors.torch import load, save

    reg, D = regularized(case)
    rng = torch.Generator().manual_seed(SEED)
    opt = kit_optimizer(D)
    for it in range(2):
        optimizer_step(case, reg, D, opt, [random_images(4, rng)], it)
    state = reg.state_dict()
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        fail(case, f"state_dict must return a dict of name -> tensor (checkpoints are "
                   f"safetensors), got {state!r:.120}")
    saved = load(save({k: v.detach().clone().contiguous() for k, v in state.items()}))
    fresh, _ = regularized(case, seed=SEED + 1)
    fresh.load_state_dict(saved)
    diff = differences(saved, {k: v.detach() for k, v in fresh.state_dict().items()})
    if diff:
        fail(case, f"load_state_dict(state_dict()) into a fresh regularizer does not give the "
                   f"state back: {diff[:5]}")
    empty, _ = regularized(case, seed=SEED + 2)
    try:
        empty.load_state_dict({})
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        fail(case, f"load_state_dict({{}}) (a checkpoint without this regularizer's state) "
                   f"raised {type(exc).__name__}: {exc}")


class _Recorder:
    """Wraps the Trainer's D loss, the regularizer's penalty and D's optimizer step: per D step,
    the gradient of each micro-batch's main loss and penalty (taken apart, from the retained
    graph), the contexts, and the gradients the optimizer saw."""

    def __init__(self, trainer: Any, reg: Any) -> None:
        self.params = list(trainer.unwrapped(trainer.D).parameters())
        self.main: list[list[list[torch.Tensor]]] = [[]]
        self.penalty: list[list[list[torch.Tensor]]] = [[]]
        self.contexts: list[list[Any]] = [[]]
        self.stepped: list[list[torch.Tensor]] = []
        loss, penalty, opt = trainer.loss, reg.penalty, trainer.opt_d
        step = opt.step

        def grads(value: torch.Tensor) -> list[torch.Tensor]:
            out = torch.autograd.grad(value, self.params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g.detach().clone()
                    for p, g in zip(self.params, out)]

        def discriminator_loss(*args, **kwargs):
            value = type(loss).discriminator_loss(loss, *args, **kwargs)
            self.main[-1].append(grads(value))
            return value

        def recorded_penalty(context):
            value = penalty(context)
            self.contexts[-1].append(context)
            self.penalty[-1].append(None if value is None else grads(value))
            return value

        def recorded_step(*args, **kwargs):
            self.stepped.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                                 for p in self.params])
            self.main.append([]), self.penalty.append([]), self.contexts.append([])
            return step(*args, **kwargs)

        loss.discriminator_loss = discriminator_loss
        reg.penalty = recorded_penalty
        opt.step = recorded_step


def _close(a: list[torch.Tensor], b: list[torch.Tensor], names: list[str]) -> list[str]:
    out = []
    for name, x, y in zip(names, a, b):
        scale = max(float(x.abs().max()), float(y.abs().max()), 1e-12)
        if not torch.allclose(x, y, rtol=1e-4, atol=1e-5 * scale):
            out.append(f"{name} (max difference {float((x - y).abs().max()):.3g} of "
                       f"{scale:.3g})")
    return out


@conformance_check("regularizers", covers=("penalty_every", "penalty", "needs"))
def check_regularizer_lazy_penalty_scaling(case: Case) -> None:
    """In the real Trainer (2 D steps of 2 micro-batches), ``penalty`` runs on the D steps ``s``
    with ``s % penalty_every == 0`` only, once per micro-batch, with a context of that step
    (phase "D", ``step`` = s, its micro-batch index, reals requiring grad iff ``needs`` has
    "real_grad", detached fakes, the unwrapped D as ``module``); the gradient D's optimizer sees
    is ``sum_m (grad L_m + every * grad P_m) / k`` on those steps and ``sum_m grad L_m / k`` on
    the others (Karras et al. 2020's lazy regularization, added in the main pass)."""
    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        recipe = trainer_recipe(name, case.create().config, iterations=1, n_critic=2,
                                micro_batch_size=4)
        trainer = small_trainer(recipe, Path(tmp) / "run")
        try:
            regs = d_regularizers(trainer)
            if len(regs) != 1:
                fail(case, f"the Trainer holds {len(regs)} D regularizers, expected 1")
            reg = regs[0]
            every = checked_every(case, reg)
            k = trainer.plan.accumulation
            record = _Recorder(trainer, reg)
            D = trainer.unwrapped(trainer.D)
            names = [n for n, _ in D.named_parameters()]
            trainer.train_iteration()
        finally:
            trainer.log.close()
    if len(record.stepped) != 2:
        fail(case, f"expected 2 D optimizer steps, saw {len(record.stepped)}")
    for s in range(2):
        due = s % every == 0
        contexts = record.contexts[s]
        if len(contexts) != (k if due else 0):
            fail(case, f"D step {s}: penalty called {len(contexts)} times, expected "
                       f"{k if due else 0} (penalty_every = {every})")
        for m, c in enumerate(contexts):
            problems = []
            if c.phase != "D" or c.step != s or c.micro_batch != m or c.num_micro_batches != k:
                problems.append(f"phase/step/micro_batch/num_micro_batches = {c.phase!r}/"
                                f"{c.step}/{c.micro_batch}/{c.num_micro_batches}, expected "
                                f"'D'/{s}/{m}/{k}")
            if c.module is not D:
                problems.append("module is not the unwrapped D")
            if c.real is None or c.fake is None or c.real_logits is None or c.fake_logits is None:
                problems.append("reals, fakes or their logits missing")
            else:
                if bool(c.real.requires_grad) != ("real_grad" in reg.needs):
                    problems.append(f"real.requires_grad = {c.real.requires_grad} with needs = "
                                    f"{sorted(reg.needs)}")
                if c.fake.requires_grad:
                    problems.append("the fakes carry G's graph in D's step")
            if problems:
                fail(case, f"D step {s}, micro-batch {m}: the Trainer's context: "
                           + "; ".join(problems))
        expected = []
        for i in range(len(names)):
            total = sum(g[i] for g in record.main[s])
            if due:
                total = total + every * sum(p[i] for p in record.penalty[s] if p is not None)
            expected.append(total / k)
        diff = _close(record.stepped[s], expected, names)
        if diff:
            fail(case, f"D step {s}: the gradient the optimizer saw is not sum_m (grad L_m"
                       f"{' + ' + str(every) + ' * grad P_m' if due else ''}) / {k}: {diff[:4]}")


def _hold_batch_norm_in_eval_mode(model: torch.nn.Module) -> None:
    """Every BatchNorm of ``model`` normalizes with its running statistics from here on, even
    after ``model.train()``: each output then depends on its own sample only."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            module.eval()
            module.train = lambda mode=True, _m=module: _m  # stays in eval mode


def _gradients_at_first_steps(case: Case, name: str, micro_batch_size: int, run_dir: Path
                              ) -> tuple[dict[str, torch.Tensor], int]:
    trainer = small_trainer(trainer_recipe(name, case.create().config, iterations=1,
                                           micro_batch_size=micro_batch_size), run_dir)
    # the fakes of a micro-batch must not depend on the split: G's BatchNorm (per micro-batch
    # statistics in training mode) uses its running statistics instead
    _hold_batch_norm_in_eval_mode(trainer.unwrapped(trainer.G))
    seen: dict[str, torch.Tensor] = {}
    calls = [0]
    try:
        (reg,) = d_regularizers(trainer)
        penalty = reg.penalty

        def counted(context):
            calls[0] += 1
            return penalty(context)

        reg.penalty = counted
        model, opt = trainer.unwrapped(trainer.D), trainer.opt_d
        original = opt.step

        def step(*args, **kwargs):
            if not seen:
                seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.grad is not None})
            return original(*args, **kwargs)

        opt.step = step
        trainer.train_iteration()
    finally:
        trainer.log.close()
    return seen, calls[0]


@conformance_check("regularizers", covers=("penalty", "needs", "penalty_every"))
def check_regularizer_penalty_micro_batches_equal_one_batch(case: Case) -> None:
    """In the real Trainer, the first D step of a batch of 8 in 2 micro-batches of 4 sees the
    gradients of one micro-batch of 8 (float32 rounding aside): a penalty is a mean over its
    micro-batch, scaled by 1/k like the loss, its random draws (if any) fixed by each sample's
    place in the global batch, not by the micro-batch. (G's BatchNorm, whose training-mode
    statistics are per micro-batch, is held in eval mode for the check, so that the fakes do
    not depend on the split either.)"""
    with registered(case.cls) as name, tempfile.TemporaryDirectory() as tmp:
        one, calls_one = _gradients_at_first_steps(case, name, 0, Path(tmp) / "one")
        two, calls_two = _gradients_at_first_steps(case, name, 4, Path(tmp) / "two")
    if (calls_one, calls_two) != (1, 2):  # the first D step (step 0) is always due
        fail(case, f"the Trainer called penalty {calls_one} time(s) with 1 micro-batch and "
                   f"{calls_two} with 2 in its first D step (expected 1 and 2)")
    if one.keys() != two.keys():
        fail(case, f"different parameters got gradients: {sorted(set(one) ^ set(two))[:5]}")
    names = sorted(one)
    diff = _close([one[n] for n in names], [two[n] for n in names], names)
    if diff:
        fail(case, f"D's gradients in the first step differ between 1 micro-batch of 8 and 2 of "
                   f"4: {diff[:4]}")


@conformance_check("regularizers", covers=("penalty", "needs", "penalty_every", "after_step"),
                   slow=True)
def check_regularizer_ddp_matches_one_process(case: Case) -> None:
    """2 gloo processes under DDP, each with 2 micro-batches of 4 per step, end 3 steps (float64)
    where one process ends with all 4 micro-batches per step (rank 0's, then rank 1's): a
    penalty's own forward passes go through ``context.discriminator`` (the DDP module) and its
    gradients are averaged with the rest; its random draws depend on each sample's place in the
    global batch, not on the process."""
    _, ddp_state = ddp_run(case)
    reg, D = regularized(case, seed=SEED)
    D = D.double()
    opt = kit_optimizer(D)
    torch.manual_seed(SEED)
    data = [rank_batches(rank) for rank in range(WORLD)]
    for it in range(STEPS):
        optimizer_step(case, reg, D, opt, [b for rank in data for b in rank[it]], it)
    diff = differences(state_of(D), ddp_state, exact=False, rtol=1e-7, atol=1e-9)
    if diff:
        fail(case, f"after {STEPS} steps, 2 DDP processes and one process with the same "
                   f"micro-batches differ: {diff[:5]}")
