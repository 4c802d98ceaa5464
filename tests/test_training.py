"""The training loop: accumulation == one big batch, exact resume, atomic checkpoints, NaN stop,
explicit arguments, callbacks from the registry."""

from __future__ import annotations

import contextlib
import json
import math

import attrs
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core import checkpoint as ckpt
from core.hookspecs import hookimpl
from core.interfaces import Architecture, Callback
from core.registry import Provider, get_registry
from core.recipe import load_recipe, recipe_to_table
from core.train import NonFiniteLossError, Trainer, TrainingCallback, build_trainer, make_accelerator

RECIPE = """
seed = 1
[dataset]
name = "stacked_digits"
num_samples = 512
[architecture]
name = "{arch}"
ch = 8
g_ch = 8
[discriminator.regularizer]
name = "sn"
[train]
iterations = 6
batch_size = 16
n_critic = 2
lr_g = 1e-3
lr_d = 1e-3
[checkpoint]
every = 3
keep = 5
[log]
every = 1
sample_every = 0
grid_size = 4
progress = false
[callbacks.spectral]
plots = false
"""


class NoBatchStatsGenerator(nn.Module):
    """A generator whose output for one latent does not depend on the rest of the batch (no
    BatchNorm), so micro-batching cannot change it; the loop is what the equivalence tests."""

    def __init__(self, z_dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.fc = nn.Linear(z_dim, 64)
        self.out = nn.Linear(64, 3 * resolution * resolution)

    def forward(self, z, y=None):
        h = torch.relu(self.fc(z))
        return torch.tanh(self.out(h)).view(-1, 3, self.resolution, self.resolution)


class NoBatchStats(Architecture):
    """resnet32's discriminator (10 convs, SN applied by the recipe) + a BatchNorm-free generator."""

    @attrs.define
    class Config:
        ch: int = 8
        g_ch: int = 8

    resolution = 32

    def build_generator(self):
        return NoBatchStatsGenerator(self.z_dim, 32)

    def build_discriminator(self):
        resnet32 = get_registry().architectures["resnet32"]
        return resnet32(resnet32.Config(ch=self.config.ch, g_ch=self.config.g_ch)).build_discriminator()


class _TestPlugin:
    @hookimpl
    def register_architectures(register):  # noqa: N805 - a namespace, as a module would be
        register("test_no_batch_stats", NoBatchStats)


@pytest.fixture
def no_batch_stats_arch():
    registry = get_registry()
    provider = Provider(name="tests.test_training")
    registry.add(_TestPlugin, provider)
    try:
        yield "test_no_batch_stats"
    finally:
        registry.remove(provider)


def write_recipe(tmp_path, arch="resnet32"):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(arch=arch))
    return path


def make_trainer(recipe, run_dir, callbacks=None):
    return build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=callbacks)


def state_of(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for key, model in trainer.models.items():
        for name, value in trainer.unwrapped(model).state_dict().items():
            out[f"{key}.{name}"] = value.detach().clone()
    return out


def sgd_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Plain SGD in place of :meth:`core.train.Trainer.build_optimizer`'s Adam, for golden tests
    across processes: SGD is linear in the gradient, so float32's summation order stays at
    rounding level; Adam divides each gradient by its own magnitude and turns the rounding noise
    of a gradient that is zero in exact arithmetic (a bias right before a BatchNorm, a class
    embedding no sample used) into a full ``lr`` step of either sign. The learning rate is the
    recipe's x 1000, so that the weights move measurably in a few steps (an Adam step is about
    ``lr`` per element, an SGD step ``lr`` x the gradient)."""
    return torch.optim.SGD(model.parameters(), lr=lr * 1e3)


def assert_trained_alike(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                         start: dict[str, torch.Tensor], skip=lambda name: False,
                         ulps: float = 1.0, zero_gradient_floor: float = 0.0) -> None:
    """Per tensor of n elements: |got - reference| <= 1e-4 x ||reference - start||
    + ulps x 2**-24 x ||reference|| + zero_gradient_floor x sqrt(n) x the largest element step
    of the network.

    float32's summation order: errors relative to how far the tensor moved, and units of rounding
    of its values (see test_accumulated_micro_batches_equal_one_big_batch, which uses the
    defaults). Across processes with BatchNorm (test_distributed) a few more units of rounding
    (normalizations such as power iteration's), and for a tensor whose gradient is zero in exact
    arithmetic (a bias right before a BatchNorm) the rounding of the cancelling sums it is made
    of, which is relative to the network's steps, not its own: ``zero_gradient_floor``."""
    u = 2.0 ** -24
    largest_step = max((reference[n].double() - start[n].double()).abs().max().item()
                       for n in reference if not skip(n) and reference[n].numel()
                       and reference[n].is_floating_point())
    breaches = []
    for name in reference:
        if skip(name):
            continue
        a, b, b0 = got[name].double(), reference[name].double(), start[name].double()
        error, moved = (a - b).norm().item(), (b - b0).norm().item()
        bound = 1e-4 * moved + ulps * u * b.norm().item() \
            + zero_gradient_floor * b.numel() ** 0.5 * largest_step
        if error > bound:
            worst = int((a - b).abs().argmax()) if a.numel() else 0
            breaches.append(
                f"{name} ({b.numel()} elements): |got - reference| = {error:.3g} > {bound:.3g} "
                f"(1e-4 x the displacement {moved:.3g} + float32 floors); worst element [{worst}]: "
                f"{a.flatten()[worst].item():.8g} vs {b.flatten()[worst].item():.8g}")
    assert not breaches, f"{len(breaches)} of {len(reference)} tensors differ:\n" + "\n".join(breaches)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, no_batch_stats_arch,
                                                      monkeypatch):
    """sn on D and on G (issue 11.1: G's power iteration ran once per micro-batch in D steps),
    n_critic = 2; G without batch statistics, so k micro-batches are exactly one big batch (with
    BatchNorm in G the exact invariant is P processes = P micro-batches: test_distributed).
    Plain SGD in place of Adam (:func:`sgd_optimizer`, as the DDP equivalence tests): Adam turns
    rounding-level differences of near-zero gradients into full steps of either sign, which
    measures Adam, not the accumulation."""
    monkeypatch.setattr(Trainer, "build_optimizer", sgd_optimizer)
    path = write_recipe(tmp_path, no_batch_stats_arch)
    g_sn = ["generator.regularizer.name=sn"]
    results = {}
    for cap in (0, 4):  # accumulation 1 vs 4
        recipe = load_recipe(path, [f"train.micro_batch_size={cap}", "train.iterations=4",
                                    "checkpoint.every=0", *g_sn])
        trainer = make_trainer(recipe, tmp_path / f"run{cap}")
        assert trainer.plan.accumulation == (1 if cap == 0 else 4)
        trainer.fit()
        results[cap] = state_of(trainer)
    one, many = results[0], results[4]
    assert one.keys() == many.keys()
    init = build_trainer(load_recipe(path, g_sn), tmp_path / "init",
                         make_accelerator(load_recipe(path)))
    start = state_of(init)  # the same seed: the initial weights of both runs
    # The two runs do the same arithmetic in another order (4 sums of 4 samples, convolutions
    # tiled for another batch size), so float32 rounding differs (unit roundoff u = 2**-24). A
    # gradient element sums up to n = 16 x 32 x 32 = 16384 terms (D's convs): summation-order
    # error ~ sqrt(n) u = 8e-6 relative (worst case n u = 1e-3); an SGD step carries it as it is,
    # and 8 steps add up to ~3x that. So per tensor, what training did (its displacement from the
    # initial weights) must agree to 1e-4 in norm. A real accumulation error changes the gradient
    # by ~1/4: with each 4th micro-batch replaced by the 3rd, every tensor's displacement differed
    # by 8e-3 to 0.33 (measured with Adam). The floor (u x the tensor's norm) is float32's
    # resolution, for a tensor training left alone. (With Adam, whose m / sqrt(v) turns a
    # rounding-level gradient near zero into a step of ~lr of either sign, the same comparison
    # passed at 6e-6 before D's pooling was folded into its convolutions and breached the bound
    # up to 7x after: the folded convolution rounds differently, not wrongly.)
    assert_trained_alike(many, one, start)
    # and training really moved the weights (the comparison is not between two initial states)
    assert not torch.allclose(start["discriminator.b1.c1.parametrizations.weight.original"],
                              one["discriminator.b1.c1.parametrizations.weight.original"])
    # G too (SN's 1/sigma keeps its SGD steps small: ~50 units of float32's resolution here,
    # against a bound of one unit, so a wrong accumulation in G would still show)
    out = "generator.out.parametrizations.weight.original"
    assert (one[out] - start[out]).norm() > 20 * 2.0 ** -24 * start[out].norm()


def test_power_iteration_runs_once_per_step_whatever_the_accumulation(tmp_path, no_batch_stats_arch):
    path = write_recipe(tmp_path, no_batch_stats_arch)
    us = []
    for cap in (0, 2):
        recipe = load_recipe(path, [f"train.micro_batch_size={cap}", "train.iterations=1"])
        trainer = make_trainer(recipe, tmp_path / f"r{cap}")
        trainer.train_iteration()
        us.append(state_of(trainer)["discriminator.b1.c1.parametrizations.weight.0._u"])
    torch.testing.assert_close(us[0], us[1], rtol=1e-5, atol=1e-7)


class Interrupt(TrainingCallback):
    """Raises in the middle of a run, after the checkpoint at ``after`` was written."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_iteration_end(self, trainer, iteration):
        if iteration == self.at:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    path = write_recipe(tmp_path)  # the real resnet32 (BatchNorm in G) with sn
    recipe = load_recipe(path)
    straight = make_trainer(recipe, tmp_path / "straight")
    straight.fit()
    reference = state_of(straight)

    run_dir = tmp_path / "interrupted"
    first = make_trainer(recipe, run_dir, callbacks=[Interrupt(at=5)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    latest = ckpt.resolve_checkpoint(run_dir)
    assert latest.name == "iter_0000003"
    second = make_trainer(recipe, run_dir)
    second.resume(latest)
    assert second.iteration == 3
    second.fit()
    resumed = state_of(second)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    # the optimizers too
    a, b = straight.opt_d.state_dict()["state"], second.opt_d.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    # the metrics log has each iteration exactly once (the crashed run's tail was dropped)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_contents_load_without_unpickling(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["train.iterations=3"])
    trainer = make_trainer(recipe, tmp_path / "run")
    trainer.fit()
    path = ckpt.resolve_checkpoint(tmp_path / "run")
    weights = load_file(str(path / ckpt.MODELS))
    assert any(k.endswith("._u") for k in weights)  # regularizer state travels
    torch.load(path / ckpt.OPTIMIZERS, weights_only=True)  # no arbitrary objects inside
    state = json.loads((path / ckpt.STATE).read_text())
    assert state["iteration"] == 3 and state["data_position"] == 3 * recipe.train.n_critic


def test_a_crash_while_writing_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path), ["train.iterations=3"])
    run_dir = tmp_path / "run"
    trainer = make_trainer(recipe, run_dir)
    trainer.fit()
    good = ckpt.resolve_checkpoint(run_dir)
    before = (good / ckpt.MODELS).read_bytes()

    def crash(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    trainer.iteration = 4
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert ckpt.resolve_checkpoint(run_dir) == good
    assert (good / ckpt.MODELS).read_bytes() == before
    monkeypatch.undo()
    fresh = make_trainer(recipe, tmp_path / "other")
    fresh.resume(ckpt.resolve_checkpoint(run_dir))  # loads fine
    assert fresh.iteration == 3
    trainer.save_checkpoint()  # the next save replaces the half-written temporary folder
    assert ckpt.resolve_checkpoint(run_dir).name == "iter_0000004"
    assert not any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").iterdir())


def test_old_checkpoints_are_pruned_to_keep(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["checkpoint.every=1", "checkpoint.keep=2"])
    trainer = make_trainer(recipe, tmp_path / "run")
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*"))
    assert names == ["iter_0000005", "iter_0000006"]


class Poison(TrainingCallback):
    def on_iteration_end(self, trainer, iteration):
        if iteration == 3:
            with torch.no_grad():
                next(trainer.unwrapped(trainer.D).parameters()).fill_(math.nan)


def test_non_finite_loss_stops_naming_iteration_and_last_checkpoint(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["checkpoint.every=2"])
    trainer = make_trainer(recipe, tmp_path / "run", callbacks=[Poison()])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "non-finite loss at iteration 4" in message
    assert "iter_0000002" in message


# ---------------------------------------------------------------------------------------------
# Explicit arguments; callbacks from the registry
# ---------------------------------------------------------------------------------------------


def test_a_trainer_assembled_by_hand_trains_as_the_one_built_from_the_recipe(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["train.iterations=2"])
    built = make_trainer(recipe, tmp_path / "built", callbacks=[])
    built.fit()
    registry = get_registry()
    torch.manual_seed(recipe.seed)  # what build_trainer does, step by step
    arch = registry.create("architectures", "resnet32", recipe.architecture.config)
    G, D = arch.build_generator(), arch.build_discriminator()
    sn = registry.create("regularizers", "sn")
    D = sn.apply(D)
    data = registry.create("datasets", "stacked_digits", recipe.dataset.config)
    trainer = Trainer(architecture=arch, generator=G, discriminator=D,
                      loss=registry.create("losses", "hinge"),
                      dataset=data.build(tmp_path / "unused", "train"), dataset_plugin=data,
                      d_regularizer=sn, train=recipe.train, log=recipe.log,
                      checkpoint=recipe.checkpoint, seed=recipe.seed, run_dir=tmp_path / "hand")
    trainer.fit()
    assert trainer.callbacks == [] and trainer.d_reg is sn and trainer.g_reg is None
    a, b = state_of(built), state_of(trainer)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert ckpt.resolve_checkpoint(tmp_path / "hand").name == "iter_0000002"


class Counting(Callback):
    """A user's callback: counts iterations every ``every``; its count survives a resume."""

    @attrs.define
    class Config:
        every: int = 1

    def __init__(self, config=None, name=None):
        super().__init__(config, name=name)
        self.events: list[tuple[str, int]] = []
        self.seen = 0

    def on_start(self, trainer):
        self.events.append(("start", trainer.iteration))

    def on_iteration_end(self, trainer, iteration):
        if iteration % self.config.every == 0:
            self.events.append(("iteration", iteration))
            self.seen += 1

    def on_end(self, trainer):
        self.events.append(("end", trainer.iteration))

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state.get("seen", 0)


class _CallbackPlugin:
    @hookimpl
    def register_callbacks(register):  # noqa: N805 - a namespace, as a module would be
        register("counting_test", Counting)


@pytest.fixture
def counting_callback():
    registry = get_registry()
    provider = Provider(name="tests.test_training.callbacks")
    registry.add(_CallbackPlugin, provider)
    try:
        yield "counting_test"
    finally:
        registry.remove(provider)


def test_a_user_callback_is_selected_by_its_recipe_table_and_its_hooks_run(tmp_path,
                                                                          counting_callback):
    path = write_recipe(tmp_path)
    recipe = load_recipe(path, ["callbacks.counting_test.every=2", "checkpoint.every=2"])
    assert recipe_to_table(recipe)["callbacks"]["counting_test"] == {"every": 2}
    run = tmp_path / "run"
    trainer = make_trainer(recipe, run)  # callbacks=None: the recipe's, from the registry
    assert [cb.name for cb in trainer.callbacks] == ["spectral", "counting_test"]
    counter = trainer.callbacks[1]
    assert isinstance(counter, Counting) and counter.config == Counting.Config(every=2)
    trainer.fit()
    assert counter.events == [("start", 0), ("iteration", 2), ("iteration", 4),
                              ("iteration", 6), ("end", 6)]
    # its state is saved in every checkpoint under its name, and handed back on resume
    middle = ckpt.resolve_checkpoint(run, "iter_0000004")
    assert ckpt.read_state(middle)["callbacks"]["counting_test"] == {"seen": 2}
    again = make_trainer(recipe, tmp_path / "again")
    again.resume(middle)
    assert again.callbacks[1].seen == 2
    # a recipe that does not name it does not get it (it is not default-enabled)
    plain = make_trainer(load_recipe(path), tmp_path / "plain")
    assert [cb.name for cb in plain.callbacks] == ["spectral"]


@pytest.mark.parametrize("d_regularizer", ["sn", "sr_static"])
def test_the_g_step_with_d_frozen_gives_g_the_same_gradients_and_leaves_d_alone(
        tmp_path, d_regularizer):
    """Issue 15: D's parameters do not require grad in the G step. G's gradients equal those of
    the G step that also computes D's weight gradients, D's gradients and weights are untouched,
    and D's parameters require grad again after the step (for the next D step)."""
    from core.train import d_weight_gradients_in_g_step

    recipe = load_recipe(write_recipe(tmp_path), [
        f"discriminator.regularizer.name={d_regularizer}", "train.micro_batch_size=8"])
    grads = {}
    for frozen in (True, False):
        trainer = make_trainer(recipe, tmp_path / f"run{frozen}")
        trainer.G.train(), trainer.D.train()
        trainer.discriminator_step()
        d_before = {n: p.detach().clone() for n, p in trainer.D.named_parameters()}
        d_grads = {n: None if p.grad is None else p.grad.clone()
                   for n, p in trainer.D.named_parameters()}
        step = trainer.opt_g.step
        seen = {}
        trainer.opt_g.step = lambda: seen.update(  # G's gradients, read before Adam's step
            {n: p.grad.clone() for n, p in trainer.G.named_parameters() if p.grad is not None})
        with contextlib.nullcontext() if frozen else d_weight_gradients_in_g_step():
            trainer.generator_step()
        trainer.opt_g.step = step
        grads[frozen] = seen
        assert all(p.requires_grad for p in trainer.D.parameters())
        for n, p in trainer.D.named_parameters():
            assert torch.equal(p, d_before[n]), n
            if frozen:  # the G step left D's gradients as the D step left them
                assert (p.grad is None and d_grads[n] is None) or torch.equal(p.grad, d_grads[n]), n
        if not frozen:  # the old way: D's weight gradients were accumulated by the G step
            assert any(p.grad is not None and d_grads[n] is not None
                       and not torch.equal(p.grad, d_grads[n])
                       for n, p in trainer.D.named_parameters())
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-6, atol=1e-9, msg=n)


def test_unwrapped_asks_accelerate_once_per_network_and_follows_a_new_discriminator(
        tmp_path, monkeypatch):
    from core.train import build_networks

    recipe = load_recipe(write_recipe(tmp_path))
    trainer = make_trainer(recipe, tmp_path / "run")
    calls = []
    unwrap = trainer.acc.unwrap_model
    monkeypatch.setattr(trainer.acc, "unwrap_model", lambda m: calls.append(m) or unwrap(m))
    for _ in range(3):
        assert trainer.unwrapped(trainer.D) is unwrap(trainer.D)
        assert trainer.unwrapped(trainer.G) is unwrap(trainer.G)
    assert len(calls) == 2  # one look-up each, then remembered
    _, _, new_d, d_regs, _ = build_networks(recipe)
    trainer.replace_discriminator(new_d, d_regs)
    assert trainer.unwrapped(trainer.D) is new_d  # the new D, not the remembered old one
    other = nn.Linear(2, 2)
    assert trainer.unwrapped(other) is other  # anything else: passed to accelerate each time
    trainer.log.close()
