"""The training loop's side of plugin contract v2 (issue 12) and power-iteration steps per D step
(issue 11.8): step contexts, lazy penalties, several regularizers per network, regularizer state
and generator EMA in checkpoints, exact resume."""

from __future__ import annotations

import json
from typing import ClassVar

import attrs
import pytest
import torch
from safetensors.torch import load_file

from core import checkpoint as ckpt
from core.hookspecs import hookimpl
from core.interfaces import Loss, Regularizer
from core.recipe import RecipeError, load_recipe
from core.registry import Provider, get_registry
from test_training import Interrupt, make_trainer, state_of, write_recipe

CALLS: list = []  # (tag, phase, step, micro_batch, k, real requires grad, module is the unwrapped)


class LinearPenalty(Regularizer):
    """penalty = weight x sum of the first parameter of the network (gradient: ``weight`` on every
    element); counts its calls in its own state; records what it was shown."""

    needs: ClassVar[frozenset[str]] = frozenset({"real_grad"})

    @attrs.define
    class Config:
        weight: float = 0.5
        every: int = 1
        tag: str = ""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.calls = torch.zeros((), dtype=torch.int64)

    def apply(self, module):
        CALLS.append(("apply", self.config.tag))
        return module

    @property
    def penalty_every(self) -> int:
        return self.config.every

    def penalty(self, context):
        real = context.real
        CALLS.append((self.config.tag, context.phase, context.step, context.micro_batch,
                      context.num_micro_batches, bool(real is not None and real.requires_grad),
                      context.module is context_module(context)))
        self.calls += 1
        first = next(context.module.parameters())
        return self.config.weight * first.sum()

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"].clone() if "calls" in state else torch.zeros((), dtype=torch.int64)


def context_module(context):
    net = context.discriminator if context.phase == "D" else context.generator
    return getattr(net, "module", net)


class RealLogitsHinge(Loss):
    """The hinge loss, whose generator loss asks for real logits (and checks it got them)."""

    needs_real_logits: ClassVar[bool] = True
    seen: ClassVar[list] = []

    @attrs.define
    class Config:
        pass

    def discriminator_loss(self, real_logits, fake_logits):
        return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()

    def generator_loss(self, fake_logits, real_logits=None):
        RealLogitsHinge.seen.append(None if real_logits is None else tuple(real_logits.shape))
        return -fake_logits.mean()


class _Plugins:
    @hookimpl
    def register_regularizers(register):  # noqa: N805
        register("test_linear_penalty", LinearPenalty)

    @hookimpl
    def register_losses(register):  # noqa: N805
        register("test_real_logits_hinge", RealLogitsHinge)


@pytest.fixture(autouse=True)
def plugins():
    registry = get_registry()
    provider = Provider(name="tests.test_loop_contract_v2")
    registry.add(_Plugins, provider)
    CALLS.clear()
    RealLogitsHinge.seen.clear()
    try:
        yield
    finally:
        registry.remove(provider)


def recipe_with(tmp_path, extra: str, overrides=()):
    path = write_recipe(tmp_path)
    text = path.read_text().replace('[discriminator.regularizer]\nname = "sn"\n', extra)
    path.write_text(text)
    return load_recipe(path, list(overrides))


PENALTIES = '''
[[discriminator.regularizers]]
name = "sn"
[[discriminator.regularizers]]
name = "test_linear_penalty"
tag = "d"
every = 3
'''


def test_several_regularizers_apply_in_order_and_the_first_is_d_reg(tmp_path):
    recipe = recipe_with(tmp_path, PENALTIES + '''
[[discriminator.regularizers]]
name = "test_linear_penalty"
tag = "d2"
''')
    trainer = make_trainer(recipe, tmp_path / "run")
    assert [c for c in CALLS if c[0] == "apply"] == [("apply", "d"), ("apply", "d2")]
    assert [r.name for r in trainer.d_regs] == ["sn", "test_linear_penalty",
                                                "test_linear_penalty"]
    assert trainer.d_reg is trainer.d_regs[0] and trainer.g_reg is None


def test_two_regularizers_on_the_same_weight_and_both_forms_are_recipe_errors(tmp_path):
    recipe = recipe_with(tmp_path, '''
[[discriminator.regularizers]]
name = "sn"
[[discriminator.regularizers]]
name = "sr_static"
''')
    with pytest.raises(RecipeError, match=r"'sn' and 'sr_static' both parametrize the same "
                                          r"weight") as info:
        make_trainer(recipe, tmp_path / "run")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(RecipeError, match=r"both \[discriminator.regularizer\] and "
                                          r"\[\[discriminator.regularizers\]\]") as info:
        recipe_with(tmp_path, '[discriminator.regularizer]\nname = "sn"\n' + PENALTIES)
    assert "recipe.toml" in str(info.value) and len(str(info.value).splitlines()) == 1
    with pytest.raises(RecipeError, match="generator only"):
        recipe_with(tmp_path, '[discriminator.ema]\ndecay = 0.9\n')
    with pytest.raises(RecipeError, match="exactly one of 'decay' and 'half_life_images'"):
        recipe_with(tmp_path, '[generator.ema]\ndecay = 0.9\nhalf_life_images = 10.0\n')


def test_penalty_gets_the_step_context_runs_lazily_and_is_scaled_by_every(tmp_path):
    recipe = recipe_with(tmp_path, PENALTIES, ["train.micro_batch_size=8"])  # k = 2
    with_penalty = make_trainer(recipe, tmp_path / "a")
    plain = make_trainer(recipe_with(tmp_path, '[discriminator.regularizer]\nname = "sn"\n',
                                     ["train.micro_batch_size=8"]), tmp_path / "b")
    for trainer in (with_penalty, plain):
        trainer.G.train(), trainer.D.train()
        trainer.discriminator_step()  # optimizer step 0 of D: the penalty runs (0 % 3 == 0)
    first = lambda t: next(t.unwrapped(t.D).parameters()).grad  # noqa: E731
    # weight x sum: gradient weight per element, x every = 3, the k micro-batches' 1/k summed
    torch.testing.assert_close(first(with_penalty) - first(plain),
                               torch.full_like(first(plain), 0.5 * 3), rtol=0, atol=1e-5)
    assert CALLS[-2:] == [("d", "D", 0, 0, 2, True, True), ("d", "D", 0, 1, 2, True, True)]
    CALLS.clear()
    for _ in range(5):  # steps 1..5: the penalty runs at step 3 only
        with_penalty.discriminator_step()
    assert [c[2] for c in CALLS] == [3, 3]
    assert with_penalty.d_steps == 6 and int(with_penalty.d_regs[1].calls) == 4


def test_reals_require_grad_only_when_an_active_penalty_needs_it(tmp_path):
    seen = []

    class Spy(torch.nn.Module):  # a hook that records whether D's input requires grad
        pass

    recipe = recipe_with(tmp_path, PENALTIES)
    trainer = make_trainer(recipe, tmp_path / "run")
    handle = trainer.unwrapped(trainer.D).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].requires_grad))
    for _ in range(3):
        trainer.discriminator_step()
    handle.remove()
    assert seen == [True, False, False]  # step 0 only (every = 3); the G step is not involved


def power_steps(module) -> list[int]:
    """Counts power-iteration steps of the sn layers of ``module``: forwards that changed u."""
    from plugins.regularizers.sn import SpectralNormWeight

    counter = [0]
    for sub in module.modules():
        if isinstance(sub, SpectralNormWeight):
            sub.register_forward_pre_hook(lambda m, a: setattr(m, "_before", m._u.clone()))
            sub.register_forward_hook(
                lambda m, a, o: counter.__setitem__(0, counter[0] + (not torch.equal(m._before,
                                                                                     m._u))))
            break  # the first sn layer stands for all
    return counter


@pytest.mark.parametrize("d_forward,g_state,expected", [
    ("joint", "update", 2 + 1), ("separate", "update", 2 * 2 + 1), ("joint", "frozen", 2),
    ("separate", "frozen", 2 * 2)])
def test_power_iteration_steps_per_iteration(tmp_path, d_forward, g_state, expected):
    """n_critic = 2 D steps and one G step per iteration, k = 2 micro-batches: joint = one
    step per D step, separate = two; the G step's D forward adds one unless frozen."""
    recipe = load_recipe(write_recipe(tmp_path), [f"train.d_forward={d_forward}",
                                                  f"train.d_state_in_g_step={g_state}",
                                                  "train.micro_batch_size=8"])
    trainer = make_trainer(recipe, tmp_path / "run")
    counter = power_steps(trainer.unwrapped(trainer.D))
    trainer.train_iteration()
    assert counter[0] == expected


def test_generator_power_iteration_and_batchnorm_statistics_step_once_per_step(tmp_path):
    """Issue 11.1 on one process: with k = 4 micro-batches, G's sn and its BatchNorm running
    statistics are updated once per optimizer step (n_critic D steps + 1 G step)."""
    recipe = load_recipe(write_recipe(tmp_path), ["train.micro_batch_size=4",
                                                  "generator.regularizer.name=sn"])
    trainer = make_trainer(recipe, tmp_path / "run")
    assert trainer.plan.accumulation == 4
    counter = power_steps(trainer.unwrapped(trainer.G))
    trainer.train_iteration()
    trainer.train_iteration()
    bns = [m for m in trainer.unwrapped(trainer.G).modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(int(m.num_batches_tracked) == 2 * (2 + 1) for m in bns)
    assert counter[0] == 2 * (2 + 1)


def test_a_loss_that_needs_real_logits_gets_them_in_the_g_step(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["loss.name=test_real_logits_hinge",
                                                  "train.micro_batch_size=8"])
    trainer = make_trainer(recipe, tmp_path / "run")
    trainer.train_iteration()
    assert RealLogitsHinge.seen == [(8,), (8,)]  # k = 2 micro-batches of 8 reals
    assert trainer.data_position == 2 + 1  # the G step drew a global batch of reals too


EMA = '''
[discriminator.regularizer]
name = "sn"
[generator.ema]
decay = 0.8
start = 2
'''


def test_ema_is_the_running_average_of_the_generator(tmp_path):
    recipe = recipe_with(tmp_path, EMA)
    trainer = make_trainer(recipe, tmp_path / "run")
    G = trainer.unwrapped(trainer.G)
    expected = None
    for iteration in range(5):
        trainer.train_iteration()
        weights = [p.detach().clone().double() for p in G.parameters()]
        if iteration <= 2:  # before start (0, 1) a copy; at start the first average is a copy
            expected = weights
        else:
            expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    got = [p.double() for p in trainer.ema.module.parameters()]
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got[0], next(G.parameters()).double())  # an average, not G
    for b_ema, b in zip(trainer.ema.module.buffers(), G.buffers()):  # buffers: copied
        assert torch.equal(b_ema, b)
    assert trainer.sampling_generator()[0] == "generator_ema"
    # EDM's half-life: decay per step = 0.5 ** (G's global batch / half_life_images)
    half = recipe_with(tmp_path, '[generator.ema]\nhalf_life_images = 320.0\n')
    assert make_trainer(half, tmp_path / "half").ema.decay == pytest.approx(0.5 ** (32 / 320))


def test_resumed_run_with_ema_and_a_penalty_is_bit_identical(tmp_path):
    extra = PENALTIES.replace("every = 3", "every = 2") + '[generator.ema]\ndecay = 0.9\n'
    recipe = recipe_with(tmp_path, extra)
    straight = make_trainer(recipe, tmp_path / "straight")
    straight.fit()
    reference = {**state_of(straight), **{f"ema.{k}": v for k, v in
                                          straight.ema.state_dict().items()}}
    run_dir = tmp_path / "interrupted"
    first = make_trainer(recipe, run_dir, callbacks=[Interrupt(at=5)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    latest = ckpt.resolve_checkpoint(run_dir)
    assert latest.name == "iter_0000003"
    saved = load_file(str(latest / ckpt.REGULARIZERS))
    assert int(saved["regularizers.discriminator.1.calls"]) == 3  # D steps 0, 2, 4 of 6
    assert any(k.startswith("generator_ema.") for k in load_file(str(latest / ckpt.MODELS)))
    assert ckpt.REGULARIZERS in json.loads((latest / ckpt.MANIFEST).read_text())["files"]
    second = make_trainer(recipe, run_dir)
    second.resume(latest)
    assert int(second.d_regs[1].calls) == 3 and second.d_steps == 6
    second.fit()
    resumed = {**state_of(second), **{f"ema.{k}": v for k, v in second.ema.state_dict().items()}}
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    assert int(second.d_regs[1].calls) == int(straight.d_regs[1].calls) == 6


@pytest.mark.slow
def test_quickstart_r1_trains_end_to_end_with_r1_and_ema(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    run_dir = tmp_path / "run"
    sets = ["train.iterations=4", "train.n_critic=2", "discriminator.regularizer.every=2",
            "generator.ema.start=2", "log.progress=false", "log.sample_every=0",
            "checkpoint.every=2", "eval.every=0", "eval.metrics.0.num_samples=200",
            "eval.metrics.1.num_samples=200", "eval.metrics.1.reference_samples=200",
            "dataset.num_samples=512", "callbacks.spectral.plots=false"]
    result = subprocess.run([sys.executable, "-m", "core.run", "zoo/quickstart_r1.toml",
                             "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert records and all(r["generator"] == "generator_ema" for r in records)
    latest = ckpt.resolve_checkpoint(run_dir)
    weights = load_file(str(latest / ckpt.MODELS))
    assert int(weights["generator_ema.n_averaged"]) == 2  # iterations 2 and 3 averaged
    assert (run_dir / "samples").is_dir()
