"""The spectral monitor (callback ``spectral``): exact spectra, the collapse alarm, the switch
(checkpoint, rebuild, resume), resume, plots."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import cattrs
import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from core import checkpoint as ckpt
from core.registry import get_registry
from core.recipe import converter, load_recipe
from core.layers import raw_weight, regularized_layers, weight_matrix
from core.interfaces import Callback
from core.spectral.alarm import CollapseAlarm
from core.spectral.history import RunHistory
from core.spectral.measure import monitored_layers, reading_weights, singular_values, summarize
from core.spectral.store import SpectraFile, layers_of, make_record, read_spectra, truncate
from core.spectral.switch import switch_discriminator_regularizer
from core.train import build_trainer, make_accelerator
from plugins.callbacks.spectral_monitor import SpectralMonitor, SpectralSection, watched

RECIPE = """
seed = 3
[dataset]
name = "stacked_digits"
num_samples = 256
[architecture]
name = "resnet32"
ch = 8
g_ch = 8
[discriminator.regularizer]
name = "sn"
[train]
iterations = 6
batch_size = 8
n_critic = 1
lr_g = 1e-3
lr_d = 1e-3
[checkpoint]
every = 0
keep = 5
[log]
every = 1
sample_every = 0
grid_size = 4
progress = false
"""

#: the regularizer the paper's rescue switches to.
RESCUE = "sr_dynamic"


def recipe_of(tmp_path, overrides=()):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    return load_recipe(path, list(overrides))


def trainer_of(recipe, run_dir, callbacks=()):
    return build_trainer(recipe, run_dir, make_accelerator(recipe), callbacks=list(callbacks))


def records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def state_of(trainer) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": v.detach().clone() for k, m in trainer.models.items()
            for n, v in trainer.unwrapped(m).state_dict().items()}


class DriveToRankOne(Callback):
    """From iteration ``start`` on, multiplies every singular value but the first of one
    discriminator layer's raw weight by ``factor`` after each iteration: a synthetic collapse."""

    def __init__(self, module: str, start: int, factor: float = 0.2) -> None:
        self.module, self.start, self.factor = module, start, factor

    def on_iteration_end(self, trainer, iteration):
        if iteration < self.start:
            return
        layer = dict(trainer.unwrapped(trainer.D).named_modules())[self.module]
        with torch.no_grad():
            W = raw_weight(layer)
            U, S, Vh = torch.linalg.svd(weight_matrix(W).double(), full_matrices=False)
            S[1:] *= self.factor
            W.copy_(((U * S) @ Vh).reshape_as(W).to(W.dtype))


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def independent_sn_weight(layer) -> np.ndarray:
    """``W / (u^T W v)`` in float64 from the raw weight and SN's buffers (Miyato et al. eq. 8)."""
    p = layer.parametrizations.weight[0]
    W = weight_matrix(raw_weight(layer)).detach().double().numpy()
    u, v = p._u.detach().double().numpy(), p._v.detach().double().numpy()
    return W / (u @ W @ v)


def test_recorded_singular_values_equal_a_float64_svd_of_the_effective_weights(tmp_path):
    recipe = recipe_of(tmp_path, ["train.iterations=3"])
    monitor = SpectralMonitor(SpectralSection(every=1), tmp_path / "run")
    trainer = trainer_of(recipe, tmp_path / "run", [monitor])
    trainer.fit()
    D = trainer.unwrapped(trainer.D)
    spectra = read_spectra(tmp_path / "run" / "spectra.npy")
    assert spectra["iteration"].tolist() == [0, 1, 2, 3]
    assert (tmp_path / "run" / "plots" / "summaries.png").is_file()  # drawn at the end
    layers = monitored_layers(D)
    assert [info.module for info, _ in layers][:10] == [
        "b1.c1", "b1.c2", "b1.sc", "b2.c1", "b2.c2", "b2.sc", "b3.c1", "b3.c2", "b4.c1", "b4.c2"]
    assert layers_of(spectra.dtype) == [info for info, _ in layers]
    last = spectra[-1]
    for info, layer in layers:
        effective = independent_sn_weight(layer)
        expected = np.linalg.svd(effective, compute_uv=False)
        assert last[info.key].shape == (min(effective.shape),)
        np.testing.assert_allclose(last[info.key], expected, rtol=2e-6, atol=1e-7,
                                   err_msg=info.key)
        # the power-iteration estimate next to the exact top singular value of the raw weight
        p = layer.parametrizations.weight[0]
        W = weight_matrix(raw_weight(layer)).detach().double().numpy()
        np.testing.assert_allclose(last[f"{info.key}.sigma_pi"],
                                   p._u.double().numpy() @ W @ p._v.double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(last[f"{info.key}.s1_raw"],
                                   np.linalg.svd(W, compute_uv=False)[0], rtol=1e-6)
    # the summaries in the metrics log are those of the exact spectrum
    logged = records(tmp_path / "run", "spectral")[-1]
    s = np.linalg.svd(independent_sn_weight(dict(D.named_modules())["b4.c2"]), compute_uv=False)
    ratio = s / s[0]
    assert logged["iteration"] == 3
    assert logged["layer_9.mass"] == pytest.approx(ratio.mean(), rel=1e-6)
    assert logged["layer_9.stable_rank"] == pytest.approx((ratio ** 2).sum(), rel=1e-6)
    assert logged["layer_9.frac_above_0.1"] == pytest.approx((ratio > 0.1).mean())
    assert logged["layer_9.s1"] == pytest.approx(s[0], rel=1e-6)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(),
                         nn.Linear(4, 2))


REGULARIZERS = [(name, {}) for name in sorted(get_registry().regularizers)] + \
    [("sr_static", {"mode": "parametrization"}), ("sr_dynamic", {"mode": "parametrization"})]


@pytest.mark.parametrize("name,config", REGULARIZERS + [("torch", {})],
                         ids=[f"{n}-{c.get('mode', 'default')}" for n, c in REGULARIZERS]
                         + ["torch"])
def test_reading_the_weights_changes_no_state_and_no_mode(name, config):
    model = small_model()
    if name == "torch":  # torch's own spectral_norm ignores frozen_state: read in eval mode
        for layer in (model[0], model[2], model[4]):
            torch.nn.utils.parametrizations.spectral_norm(layer)
    else:
        cls = get_registry().regularizers[name]
        cls(converter.structure(config, cls.Config)).apply(model)
    model.train()
    model(torch.randn(2, 3, 3, 3))  # one training-mode forward: state moves off its init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with reading_weights(model):
        for _, layer in monitored_layers(model):
            layer.weight
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), name
    assert modes == [m.training for m in model.modules()]


@pytest.mark.parametrize("flavour", ["sn", "torch"])
def test_the_weight_read_is_w_over_the_power_iteration_sigma(flavour):
    model = small_model()
    for layer in (model[0], model[2], model[4]):
        if flavour == "torch":
            torch.nn.utils.parametrizations.spectral_norm(layer)
    if flavour == "sn":
        get_registry().create("regularizers", "sn").apply(model)
    model(torch.randn(2, 3, 3, 3))
    with reading_weights(model):
        weights = [layer.weight.clone() for _, layer in monitored_layers(model)]
    for w, (_, layer) in zip(weights, monitored_layers(model)):
        p = layer.parametrizations.weight[0]
        W = weight_matrix(raw_weight(layer)).detach()
        torch.testing.assert_close(weight_matrix(w), W / torch.dot(p._u, W @ p._v))


@pytest.mark.parametrize("smallest", [0.1, 1e-2, 1e-6, 0.0])
def test_singular_values_are_exact_also_for_a_collapsed_spectrum(smallest):
    """Healthy spectra take the Gram route, collapsed ones LAPACK's SVD: both exact."""
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(360, 40, dtype=torch.float64, generator=gen))
    if smallest > 0:  # s1 = 3 down to smallest * s1, evenly in log
        s = 3.0 * torch.logspace(0, math.log10(smallest), 40, dtype=torch.float64)
    else:  # exactly rank one
        s = torch.zeros(40, dtype=torch.float64)
        s[0] = 3.0
    A = (U * s) @ V.mT
    np.testing.assert_allclose(singular_values(A), s.numpy(), rtol=1e-9, atol=1e-13)
    for matrix in (A.mT, A.float()):  # tall, and float32 input
        want = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
        np.testing.assert_allclose(singular_values(matrix), want, rtol=1e-9, atol=1e-13)
    assert np.isnan(singular_values(torch.full((3, 4), math.nan))).all()


def test_summaries_of_known_spectra():
    s = np.array([2.0, 1.0, 0.5, 0.1])
    out = summarize(s, sigma_pi=1.5, s1_raw=2.0)
    assert out["s1"] == 2.0
    assert out["mass"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert out["stable_rank"] == pytest.approx(1 + 0.25 + 0.0625 + 0.0025)
    assert out["frac_above_0.1"] == 0.75
    assert out["sigma_ratio"] == 0.75
    assert np.isnan(summarize(np.zeros(3))["mass"])


# ---------------------------------------------------------------------------------------------
# The record file
# ---------------------------------------------------------------------------------------------


def small_layers():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv2d(5, 4, 1), nn.Linear(4, 1))
    return model, [info for info, _ in monitored_layers(model)]


def fake_record(dtype, iteration):
    from core.spectral.measure import LayerSpectrum

    rng = np.random.default_rng(iteration)
    spectra = [LayerSpectrum(np.sort(rng.random(info.rank))[::-1], 0.9, 1.0)
               for info in layers_of(dtype)]
    return make_record(dtype, iteration, spectra)


def test_record_file_is_one_appendable_npy_that_survives_a_crash_mid_append(tmp_path):
    _, layers = small_layers()
    path = tmp_path / "spectra.npy"
    store = SpectraFile(path, layers)
    written = [fake_record(store.dtype, i) for i in (0, 10, 20)]
    for r in written:
        store.append(r)
    loaded = np.load(path)  # plain numpy reads it
    assert loaded["iteration"].tolist() == [0, 10, 20]
    assert loaded.dtype.fields["layer_0"][2] == "0 Conv2d 5x3x3x3"
    assert loaded["layer_0"].shape == (3, 5) and loaded["layer_1"].shape == (3, 4)
    np.testing.assert_array_equal(loaded["layer_1"][2], written[2]["layer_1"])
    # a crash while appending: part of a record past the committed count
    with path.open("ab") as fh:
        fh.write(fake_record(store.dtype, 30).tobytes()[:7])
    assert read_spectra(path)["iteration"].tolist() == [0, 10, 20]
    assert np.load(path)["iteration"].tolist() == [0, 10, 20]
    store = SpectraFile(path, layers)  # reopened (a resumed run): appends after the last record
    store.append(fake_record(store.dtype, 30))
    assert read_spectra(path)["iteration"].tolist() == [0, 10, 20, 30]
    with path.open("rb") as fh:
        np.lib.format.read_magic(fh)
        assert np.lib.format.read_array_header_1_0(fh)[0] == (4,)
        data_start = fh.tell()
    assert data_start % 64 == 0
    assert path.stat().st_size == data_start + 4 * store.dtype.itemsize  # the torn bytes are gone
    assert truncate(path, 15) == 2
    assert np.load(path)["iteration"].tolist() == [0, 10]


def test_a_record_file_of_another_network_is_moved_aside(tmp_path):
    _, layers = small_layers()
    path = tmp_path / "spectra.npy"
    SpectraFile(path, layers).append(fake_record(SpectraFile(path, layers).dtype, 0))
    other = [info for info, _ in monitored_layers(nn.Linear(3, 3))]
    store = SpectraFile(path, other)
    assert store.moved_aside is not None and store.moved_aside.is_file()
    assert len(read_spectra(path)) == 0 and len(read_spectra(store.moved_aside)) == 1


# ---------------------------------------------------------------------------------------------
# The alarm
# ---------------------------------------------------------------------------------------------


def test_alarm_rule_fires_once_per_episode_and_rearms():
    alarm = CollapseAlarm(mass_drop=0.5)
    assert alarm.update(0, {"a": 0.6, "b": 0.7}) == []
    assert alarm.update(1, {"a": 0.8, "b": 0.7}) == []      # running max of a: 0.8
    assert alarm.update(2, {"a": 0.41, "b": 0.7}) == []     # 0.41 >= 0.4: not yet
    fired = alarm.update(3, {"a": 0.39, "b": 0.7})
    assert [(c.layer, c.new) for c in fired] == [("a", True)] and fired[0].peak == 0.8
    assert alarm.update(4, {"a": 0.1, "b": 0.7}) == []      # still collapsed: no second alarm
    assert alarm.running_max["a"] == 0.8                    # collapsed values do not lower it
    assert alarm.update(5, {"a": 0.5, "b": 0.7}) == []      # recovered: re-armed
    assert [c.layer for c in alarm.update(6, {"a": 0.2, "b": 0.7})] == ["a"]
    assert alarm.raised == [3, 6]
    restored = CollapseAlarm(mass_drop=0.5)
    restored.load_state_dict(json.loads(json.dumps(alarm.state_dict())))
    assert restored == alarm


def test_alarm_warmup_and_min_layers():
    alarm = CollapseAlarm(mass_drop=0.5, warmup=10, min_layers=2)
    assert alarm.update(0, {"a": 0.9, "b": 0.9}) == []       # before warmup: not a level
    assert alarm.update(10, {"a": 0.4, "b": 0.4}) == []
    assert alarm.running_max == {"a": 0.4, "b": 0.4}
    assert alarm.update(20, {"a": 0.1, "b": 0.4}) == []      # one layer of the two needed
    fired = alarm.update(30, {"a": 0.1, "b": 0.1})
    assert sorted((c.layer, c.new) for c in fired) == [("a", False), ("b", True)]


def test_1x1_shortcuts_and_named_layers_are_not_watched():
    from core.spectral.measure import LayerInfo

    conv3 = LayerInfo(0, "b1.c1", "Conv2d", (8, 3, 3, 3))
    shortcut = LayerInfo(2, "b1.sc", "Conv2d", (8, 3, 1, 1))
    assert watched(conv3, SpectralSection()) and not watched(shortcut, SpectralSection())
    assert watched(shortcut, SpectralSection(ignore_1x1=False))
    assert not watched(conv3, SpectralSection(ignore=["b1.*"]))
    assert not watched(conv3, SpectralSection(ignore=["layer_0"]))


def expected_alarm_iteration(spectra, key, drop=0.5):
    """When the rule must fire, from the recorded spectra in float64."""
    peak = -np.inf
    for row in spectra:
        s = np.asarray(row[key], dtype=np.float64)
        mass = (s / s[0]).mean()
        if mass < drop * peak:
            return int(row["iteration"])
        peak = max(peak, mass)
    return None


def test_alarm_fires_on_a_layer_driven_to_rank_one_and_not_on_a_healthy_run(tmp_path):
    recipe = recipe_of(tmp_path)
    healthy = SpectralMonitor(SpectralSection(every=1, plots=False), tmp_path / "healthy")
    trainer_of(recipe, tmp_path / "healthy", [healthy]).fit()
    assert records(tmp_path / "healthy", "alarm") == []
    assert healthy.alarm.raised == []

    run = tmp_path / "collapsing"
    monitor = SpectralMonitor(SpectralSection(every=1, plots=False, action="checkpoint"), run)
    trainer_of(recipe, run, [DriveToRankOne("b4.c2", start=2), monitor]).fit()
    spectra = read_spectra(run / "spectra.npy")
    when = expected_alarm_iteration(spectra, "layer_9")
    assert when is not None and 2 <= when <= 6
    alarms = records(run, "alarm")
    assert [(a["iteration"], a["layers"], a["action"]) for a in alarms] == \
        [(when, ["layer_9"], "checkpoint")]
    # by then the layer is nearly rank one: s2/s1 is small
    s = spectra[spectra["iteration"] == when]["layer_9"][0]
    assert s[1] / s[0] < 0.25
    # the checkpoint taken right then, and the periodic ones are untouched by it
    saved = ckpt.resolve_checkpoint(run, f"alarm_{ckpt.checkpoint_name(when)}")
    assert ckpt.read_state(saved)["iteration"] == when
    assert ckpt.resolve_checkpoint(run).name == ckpt.checkpoint_name(6)


def test_an_ignored_1x1_shortcut_driven_to_rank_one_raises_nothing(tmp_path):
    recipe = recipe_of(tmp_path, ["train.iterations=4"])
    run = tmp_path / "run"
    monitor = SpectralMonitor(SpectralSection(every=1, plots=False), run)
    trainer_of(recipe, run, [DriveToRankOne("b2.sc", start=1, factor=0.05), monitor]).fit()
    assert expected_alarm_iteration(read_spectra(run / "spectra.npy"), "layer_5") is not None
    assert records(run, "alarm") == []


# ---------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------


def parametrization_types(module):
    return {name: [type(p).__name__ for p in layer.parametrizations.weight]
            for name, layer in regularized_layers(module)}


def named(model) -> dict[str, torch.Tensor]:
    """Parameters by name as if no weight were parametrized (SN's and SR's layouts alike)."""
    return {n.replace(".parametrizations.weight.original", ".weight"): p
            for n, p in model.named_parameters()}


def test_switch_keeps_weights_optimizer_moments_and_power_iteration_vectors(tmp_path):
    recipe = recipe_of(tmp_path, ["train.lr_decay=none"])  # still learning after the last one
    trainer = trainer_of(recipe, tmp_path / "run")
    trainer.fit()  # some Adam state to keep
    D = trainer.unwrapped(trainer.D)
    raw = {n: p.detach().clone() for n, p in named(D).items()}
    adam = {n: {k: v.clone() for k, v in trainer.opt_d.state[p].items()}
            for n, p in named(D).items()}
    us = {name: layer.parametrizations.weight[0]._u.clone()
          for name, layer in regularized_layers(D)}
    cpu_rng = torch.get_rng_state()
    new = switch_discriminator_regularizer(trainer, RESCUE, seed=11)
    assert torch.equal(torch.get_rng_state(), cpu_rng)  # the global stream is untouched
    assert trainer.d_reg is new and type(new) is get_registry().regularizers[RESCUE]
    # a new network with the new regularizer, trained by a new optimizer...
    D2 = trainer.unwrapped(trainer.D)
    fresh = get_registry().create("regularizers", RESCUE).apply(
        recipe.architecture.create().build_discriminator())
    assert parametrization_types(D2) == parametrization_types(fresh)
    assert parametrization_types(D2) != parametrization_types(D)
    optimized = [p for group in trainer.opt_d.param_groups for p in group["params"]]
    assert [id(p) for p in optimized] == [id(p) for p in D2.parameters()]
    # ... holding what the old one had: weights, Adam moments and step, SN's vectors
    after = named(D2)
    assert after.keys() == raw.keys()
    for name, p in after.items():
        assert torch.equal(p, raw[name]), name
        state = trainer.opt_d.state[p]
        assert state.keys() == adam[name].keys(), name
        for key, value in adam[name].items():
            assert torch.equal(state[key], value), f"{name}.{key}"
    for name, layer in regularized_layers(D2):
        assert torch.equal(layer.parametrizations.weight[0]._u, us[name]), name
    # the new regularizer's own state starts fresh: SR-d has not initialized its gamma yet
    compensated = [layer.parametrizations.weight[0] for _, layer in regularized_layers(D2)
                   if hasattr(layer.parametrizations.weight[0], "_initialized")]
    assert len(compensated) >= 9 and not any(bool(p._initialized) for p in compensated)
    # it went through a checkpoint of the run as it was, kept
    saved = ckpt.resolve_checkpoint(tmp_path / "run", f"switch_{ckpt.checkpoint_name(6)}")
    assert ckpt.read_state(saved)["iteration"] == 6
    trainer.train_iteration()  # and it trains
    assert any(not torch.equal(p, raw[n]) for n, p in named(D2).items())


def test_the_rebuilt_discriminator_is_a_function_of_its_seed_alone():
    from core.spectral.switch import build_regularized_discriminator

    arch = get_registry().create("architectures", "resnet32",
                                 get_registry().architectures["resnet32"].Config(ch=8, g_ch=8))
    reg = get_registry().create("regularizers", RESCUE)
    built = []
    for seed, noise in ((5, 0), (5, 3), (6, 0)):
        torch.rand(noise)  # the global stream elsewhere: must not matter
        before = torch.get_rng_state()
        built.append(build_regularized_discriminator(arch, reg, seed).state_dict())
        assert torch.equal(torch.get_rng_state(), before)  # and is left as it was
    (a, b, c) = built
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_switch_action_continues_training_with_sr_dynamic(tmp_path, monkeypatch):
    recipe = recipe_of(tmp_path)
    run = tmp_path / "run"
    config = SpectralSection(every=1, plots=False, action="switch", switch_to=RESCUE)
    monitor = SpectralMonitor(config, run)
    at_switch = {}

    class Watch(Callback):  # after the monitor: sees the switch as soon as it happens
        def on_iteration_end(self, trainer, iteration):
            if monitor.switched and not at_switch:
                at_switch.update(iteration=iteration, state=state_of(trainer))

    trainer = trainer_of(recipe, run, [DriveToRankOne("b4.c2", start=2), monitor, Watch()])
    calls = []
    rescue_cls = get_registry().regularizers[RESCUE]
    original_after_step = rescue_cls.after_step

    def spy(self, module, iteration):
        calls.append(iteration)
        return original_after_step(self, module, iteration)

    monkeypatch.setattr(rescue_cls, "after_step", spy)
    trainer.fit()
    monkeypatch.undo()
    when = monitor.switched["iteration"]
    assert when == at_switch["iteration"] and when < recipe.train.iterations
    assert monitor.switched["to"] == RESCUE and monitor.switched["from"] == "sn"
    assert isinstance(trainer.d_reg, rescue_cls) and trainer.d_reg.name == RESCUE
    # the switch went through its checkpoint, which says it switched (a resume replays it)
    saved = ckpt.resolve_checkpoint(run, f"switch_{ckpt.checkpoint_name(when)}")
    spectral_state = ckpt.read_state(saved)["callbacks"][monitor.name]
    assert spectral_state["switched"]["iteration"] == when
    D = trainer.unwrapped(trainer.D)
    fresh = rescue_cls().apply(recipe.architecture.create().build_discriminator())
    assert parametrization_types(D) == parametrization_types(fresh)
    # the regularizer acted on every discriminator step after the switch, and training went on
    assert sorted(set(calls)) == list(range(when, recipe.train.iterations))
    end = state_of(trainer)
    moved = [k for k, v in at_switch["state"].items() if k.startswith("discriminator.")
             and k.endswith(".original") and not torch.equal(v, end[k])]
    assert len(moved) >= 10
    alarm = records(run, "alarm")[0]
    assert alarm["action"] == "switch" and alarm["switched"] == {"from": "sn", "to": RESCUE}
    assert alarm["checkpoint"] == str(saved)


def test_resuming_from_the_switch_checkpoint_continues_exactly_as_the_switched_run(tmp_path):
    """Switching is checkpoint -> rebuild -> resume: a run resumed from the switch's own
    checkpoint ends bit-identical to the run that switched in process."""
    recipe = recipe_of(tmp_path)
    config = SpectralSection(every=1, plots=False, action="switch", switch_to=RESCUE)

    def callbacks(run):
        return [DriveToRankOne("b4.c2", start=2), SpectralMonitor(config, run)]

    straight = trainer_of(recipe, tmp_path / "straight", callbacks(tmp_path / "straight"))
    straight.fit()
    when = straight.callbacks[1].switched["iteration"]
    assert when < recipe.train.iterations
    switch = ckpt.resolve_checkpoint(tmp_path / "straight", f"switch_{ckpt.checkpoint_name(when)}")
    run = tmp_path / "resumed"
    resumed = trainer_of(recipe, run, callbacks(run))
    resumed.resume(switch)
    assert resumed.d_reg.name == "sn"  # the recipe's; on_start replays the switch
    resumed.fit()
    assert type(resumed.d_reg) is type(straight.d_reg)
    reference, got = state_of(straight), state_of(resumed)
    assert reference.keys() == got.keys()
    for name in reference:
        assert torch.equal(reference[name], got[name]), name
    a, b = straight.opt_d.state_dict()["state"], resumed.opt_d.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_iteration_end(self, trainer, iteration):
        if iteration == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("action", ["warn", "switch"])
def test_records_survive_resume_without_gaps_or_duplicates(tmp_path, action):
    recipe = recipe_of(tmp_path, ["checkpoint.every=3"])
    config = SpectralSection(every=1, plots=False, action=action, switch_to=RESCUE)

    def callbacks(run):
        return [DriveToRankOne("b4.c2", start=1, factor=0.1), SpectralMonitor(config, run)]

    straight = trainer_of(recipe, tmp_path / "straight", callbacks(tmp_path / "straight"))
    straight.fit()
    run = tmp_path / "interrupted"
    first = trainer_of(recipe, run, [*callbacks(run), Interrupt(at=5)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert read_spectra(run / "spectra.npy")["iteration"].tolist() == [0, 1, 2, 3, 4, 5]
    second = trainer_of(recipe, run, callbacks(run))
    second.resume(ckpt.resolve_checkpoint(run))
    assert second.iteration == 3
    second.fit()
    got = read_spectra(run / "spectra.npy")
    want = read_spectra(tmp_path / "straight" / "spectra.npy")
    assert got["iteration"].tolist() == list(range(7))
    assert got.tobytes() == want.tobytes()  # exactly what the uninterrupted run recorded
    reference, resumed = state_of(straight), state_of(second)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    if action == "switch":
        assert straight.callbacks[1].switched["iteration"] <= 3  # switched before the checkpoint
        assert type(second.d_reg) is type(straight.d_reg) is get_registry().regularizers[RESCUE]
    alarms = [a["iteration"] for a in records(run, "alarm")]
    assert alarms == [a["iteration"] for a in records(tmp_path / "straight", "alarm")]


# ---------------------------------------------------------------------------------------------
# The recipe section and the factory
# ---------------------------------------------------------------------------------------------


def test_spectral_section_is_structured_strictly():
    section = converter.structure({"every": 100, "action": "checkpoint", "ignore": ["b1.*"]},
                                  SpectralSection)
    assert section == SpectralSection(every=100, action="checkpoint", ignore=["b1.*"])
    with pytest.raises(cattrs.BaseValidationError) as info:
        converter.structure({"action": "panic", "every": "often"}, SpectralSection)
    problems = cattrs.transform_error(info.value)
    assert len(problems) == 2 and any("panic" in p and "$.action" in p for p in problems)
    with pytest.raises(ValueError, match="unknown regularizer 'sr_dinamic'.*did you mean"):
        SpectralSection(action="switch", switch_to="sr_dinamic")
    with pytest.raises(ValueError, match="switch_config.*fracton.*valid keys"):
        SpectralSection(action="switch", switch_to=RESCUE, switch_config={"fracton": 0.5})
    with pytest.raises(ValueError, match="mass_drop"):
        SpectralSection(mass_drop=1.5)
    # the switch target is only checked where it is used
    assert SpectralSection(switch_to="nonexistent").action == "warn"


def test_the_monitor_comes_from_the_recipe_s_callback_table_and_is_on_by_default(tmp_path):
    default = recipe_of(tmp_path)  # no [callbacks.spectral]: default-enabled
    assert default.callbacks["spectral"].config == SpectralSection()
    recipe = recipe_of(tmp_path, ["callbacks.spectral.every=2",
                                  "callbacks.spectral.action=checkpoint"])
    trainer = build_trainer(recipe, tmp_path / "run", make_accelerator(recipe))
    (monitor,) = trainer.callbacks
    assert isinstance(monitor, SpectralMonitor) and monitor.name == "spectral"
    assert monitor.config == SpectralSection(every=2, action="checkpoint")
    assert trainer_of(recipe, tmp_path / "none").callbacks == []  # explicit callbacks: as given


def test_switch_from_an_unregularized_discriminator_is_refused_before_training(tmp_path):
    from core.errors import SpecregError

    recipe = recipe_of(tmp_path)
    recipe.discriminator.regularizer = None
    monitor = SpectralMonitor(SpectralSection(action="switch", switch_to=RESCUE))
    trainer = trainer_of(recipe, tmp_path / "run", [monitor])
    with pytest.raises(SpecregError, match="needs a discriminator regularizer"):
        trainer.fit()
    assert trainer.iteration == 0


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def test_plot_command_writes_every_figure_for_one_run_and_for_several(tmp_path):
    from PIL import Image

    from core.plot import choose_records, main

    recipe = recipe_of(tmp_path, ["train.iterations=4"])
    runs = []
    for name, drive in (("a", None), ("b", DriveToRankOne("b4.c2", start=2))):
        run = tmp_path / name
        monitor = SpectralMonitor(SpectralSection(every=1, plots=False), run)
        callbacks = [c for c in (drive, monitor) if c]
        trainer = trainer_of(recipe, run, callbacks)
        trainer.fit()
        trainer.log = type(trainer.log)(run, tensorboard=False)
        for it, value in ((2, 500.0), (4, 420.0)):  # what the evaluation loop writes
            trainer.log.write("eval", it, {"modes.modes": value, "modes.kl": value / 1000})
        runs.append(run)
    alarms = [a["iteration"] for a in records(runs[1], "alarm")]
    assert alarms and not records(runs[0], "alarm")
    # a run being written: a half line in the log, half a record in the spectra file
    with (runs[1] / "metrics.jsonl").open("a") as fh:
        fh.write('{"event": "spectral", "iter')
    with (runs[1] / "spectra.npy").open("ab") as fh:
        fh.write(b"\0" * 11)
    assert main([str(runs[1]), "--out", str(tmp_path / "one"), "--curves", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted([f"spectra_layer_{k}.png" for k in range(10)] +
                           ["layers_at_4.png", "mass_and_quality.png", "summaries.png"])
    for p in (tmp_path / "one").glob("*.png"):
        assert Image.open(p).size[0] > 300
    history = RunHistory.load(runs[1])
    assert sorted(history.quality) == ["modes.kl", "modes.modes"]
    assert history.quality["modes.modes"][1].tolist() == [500.0, 420.0]
    assert [a["iteration"] for a in history.alarms] == alarms
    out = str(tmp_path / "cmp")
    assert main([str(runs[0]), str(runs[1]), "--out", out, "--iteration", "3"]) == 0
    assert (tmp_path / "cmp" / "compare_layer_0.png").is_file()
    assert (tmp_path / "cmp" / "compare_layers.png").is_file()
    assert (tmp_path / "cmp" / "compare_mass.png").is_file()
    assert main([str(runs[0]), "--iteration", "77"]) == 2
    assert main([str(tmp_path)]) == 2  # not a run folder with records
    assert choose_records(3, 10) == [0, 1, 2]
    assert choose_records(101, 5) == [0, 25, 50, 75, 100]


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------

WORKER = """
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, {tests!r})
from test_spectral import DriveToRankOne
from core.recipe import load_recipe
from core.run import shutdown
from core.train import build_trainer, make_accelerator
from plugins.callbacks.spectral_monitor import SpectralMonitor, SpectralSection

out = Path(sys.argv[1])
recipe = load_recipe(sys.argv[2], sys.argv[3:])
acc = make_accelerator(recipe)
config = SpectralSection(every=1, plots=False, action="switch", switch_to={rescue!r})
monitor = SpectralMonitor(config, out / "run")
trainer = build_trainer(recipe, out / "run", acc, callbacks=[DriveToRankOne("b4.c2", start=2), monitor])
trainer.fit()
state = {{f"{{k}}.{{n}}": v.detach().cpu().clone().contiguous() for k, m in trainer.models.items()
         for n, v in trainer.unwrapped(m).state_dict().items()}}
save_file(state, str(out / f"rank{{acc.process_index}}.safetensors"))
(out / f"switched{{acc.process_index}}.txt").write_text(str(monitor.switched["iteration"]))
acc.wait_for_everyone()
shutdown(0)
"""


@pytest.mark.slow
def test_two_processes_switch_at_the_same_iteration_and_stay_identical(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "recipe.toml").write_text(RECIPE)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(tests=str(REPO / "tests"), rescue=RESCUE))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker), str(tmp_path),
           str(tmp_path / "recipe.toml"), "train.cpu=true", "train.iterations=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "switched0.txt").read_text() == (tmp_path / "switched1.txt").read_text()
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        if "running_" in name or "num_batches_tracked" in name:
            continue  # G's BatchNorm statistics are per process
        assert torch.equal(rank0[name], rank1[name]), name
    assert read_spectra(tmp_path / "run" / "spectra.npy")["iteration"].tolist() == list(range(6))
    assert len(records(tmp_path / "run", "alarm")) == 1
    assert result.stderr.count("spectral collapse at iteration") == 1
