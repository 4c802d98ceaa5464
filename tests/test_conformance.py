"""The conformance kit (:mod:`core.testing`): run over every registered built-in, and tested itself.

- Every built-in plugin, parametrized over the registry (like timm's model tests), goes through
  the same checks a third party runs: a module dropped into ``plugins/`` is checked the moment it
  is registered. Small Configs come from the named table ``SMALL`` below, else from the kit's
  ``small_config`` (``SMALL_VALUES`` for the fields a Config has); exclusions would be named in
  ``EXCLUDED``, and plugins too slow for the fast suite in ``SLOW`` (their checks are marked
  slow and still run in CI).
- Meta-tests: every hook of :mod:`core.hookspecs` has checks, and every public member of every
  plugin interface is exercised by at least one check.
- The kit can fail: deliberately broken plugins fail the check that guards what they break,
  and minimal correct ones pass every check.
"""

from __future__ import annotations

import atexit
import inspect
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core import hookspecs, testing
from core.interfaces import (PLUGIN_KINDS, Architecture, Dataset, Loss, Metric, MetricResult,
                             Regularizer)
from core.registry import get_registry
from core.layers import state_updates_enabled, weight_layers, weight_matrix
from core.testing import Case, ConformanceError, parametrize_with_checks

BUILTIN = "specreg (built-in)"

#: Config keyword arguments that keep each built-in small; several entries = several cases.
SMALL: dict[str, list[dict[str, Any]]] = {
    "architectures/resnet32": [dict(ch=8, g_ch=8), dict(ch=8, g_ch=8, num_classes=5)],
    "architectures/resnet128": [dict(ch=2, g_ch=2, num_classes=5), dict(ch=2, g_ch=2, num_classes=0)],
    "architectures/cnn": [dict(ch=4, g_ch=16, resolution=32), dict(ch=4, g_ch=16, resolution=48)],
    "datasets/cifar10": [dict(resolution=8), dict(resolution=8, dequantize=True,
                                                   resize_filter="cv2-linear")],
    "datasets/stl10": [dict(resolution=8)],
    "datasets/celeba": [dict(resolution=8)],
    "datasets/imagenet": [dict(resolution=8, num_classes=3)],
    "metrics/fid": [dict(num_samples=64, reference_samples=64, download=False)],
    "metrics/is": [dict(num_samples=64, splits=2, download=False)],
}
#: built-ins the kit does not run over, each with the reason (none today).
EXCLUDED: dict[str, str] = {}
#: built-ins whose checks are marked slow, each with the reason.
SLOW: dict[str, str] = {
    "metrics/fid": "FID takes a 2048x2048 matrix square root (scipy sqrtm): ~25 s per evaluation",
}

_ROOT: Path | None = None


def metrics_root() -> Path:
    """One data root for all metric cases: the digit classifier and Inception stand-in are made
    once (removed when the test process exits)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="specreg-kit-metrics-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


class TinyInception(nn.Module):
    """A stand-in with the interface of clean-fid's TorchScript Inception (``layers`` to 2048-d
    pool features of 299x299 inputs in [-1, 1], ``output`` to 1008 logits, and
    ``forward(x, return_features)`` resizing [0, 255] images inside): the metrics' whole
    pipeline runs, without the real weights (which cannot be downloaded here)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, 2048, 4), nn.Tanh())
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128)
        if return_features:
            return features
        return self.output(features.flatten(1))


def write_tiny_inception(root: Path) -> None:
    from plugins.metrics.inception import WEIGHTS_FILENAME

    path = root / ".cache" / "inception" / WEIGHTS_FILENAME  # the metrics' default location
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.jit.script(TinyInception()).save(str(path))


def _prepare(cls: type, plugin: Any):
    from plugins.datasets.base import ImageDataset

    if issubclass(cls, ImageDataset):
        return lambda root: testing.write_prepared_sample(plugin, root)
    if issubclass(cls, Metric) and any(f.name == "inception_weights"
                                       for f in attrs.fields(cls.Config)):
        return write_tiny_inception
    return None


def builtin_cases() -> list[Case]:
    """A case for every registered built-in (several where ``SMALL`` lists several Configs)."""
    registry = get_registry()
    cases = []
    for kind in PLUGIN_KINDS:
        table = registry.kinds[kind]
        for name in sorted(table):
            key = f"{kind}/{name}"
            if table.providers[name].distribution != BUILTIN or key in EXCLUDED:
                continue
            cls = table[name]
            variants = SMALL.get(key, [{}])
            for i, values in enumerate(variants):
                plugin = cls(testing.small_config(cls, **values))
                cases.append(Case(plugin, prepare=_prepare(cls, plugin),
                                  id=key if len(variants) == 1 else f"{key}[{i}]",
                                  root=metrics_root() if kind == "metrics" else None,
                                  slow=key in SLOW))
    return cases


BUILTIN_CASES = builtin_cases()

@parametrize_with_checks(BUILTIN_CASES)
def test_builtin_plugin_conforms(plugin, check):
    check(plugin)


# ---------------------------------------------------------------------------------------------
# Meta-tests
# ---------------------------------------------------------------------------------------------


def test_every_builtin_is_run_through_the_kit():
    registry = get_registry()
    expected = {f"{kind}/{name}" for kind in PLUGIN_KINDS for name in registry.kinds[kind]
                if registry.kinds[kind].providers[name].distribution == BUILTIN}
    covered = {case.id.split("[")[0] for case in BUILTIN_CASES}
    assert covered == expected - set(EXCLUDED)
    assert {"losses/hinge", "losses/ns", "losses/wasserstein", "losses/rahinge",
            "regularizers/r1", "regularizers/wgan_gp", "datasets/stacked_digits"} <= covered


def test_every_hook_has_conformance_checks():
    hooks = [name for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")]
    assert len(hooks) == len(PLUGIN_KINDS)
    for hook in hooks:
        kind = hook.removeprefix("register_")
        assert testing.CHECKS.get(kind), f"hook {hook} has no conformance checks in core.testing"


@pytest.mark.parametrize("kind", list(PLUGIN_KINDS))
def test_every_interface_member_is_exercised_by_a_check(kind):
    members = testing.interface_members(PLUGIN_KINDS[kind])
    missing = members - testing.covered_members(kind)
    assert not missing, f"{kind}: no conformance check exercises {sorted(missing)}"
    assert {"Config", "name"} <= members  # Plugin's: the class attribute and the instance's name


def test_parametrize_with_checks_names_cases_and_marks_the_multi_process_check_slow():
    mark = parametrize_with_checks([GoodSN, Hinge()]).mark
    names, params = mark.args
    assert names == ("plugin", "check")
    ids = [p.id for p in params]
    assert "regularizers/GoodSN-check_regularizer_consistent_across_processes" in ids
    assert "losses/Hinge-check_loss_is_a_batch_mean" in ids
    slow = {p.id for p in params if any(m.name == "slow" for m in p.marks)}
    assert slow == {"regularizers/GoodSN-check_regularizer_consistent_across_processes",
                    "regularizers/GoodSN-check_regularizer_ddp_matches_one_process"}
    assert len(ids) == len(testing.checks_for(GoodSN)) + len(testing.checks_for(Hinge))


def test_registered_is_temporary_and_restores_the_class():
    registry = get_registry()
    before = {kind: dict(registry.kinds[kind]) for kind in PLUGIN_KINDS}
    with testing.registered(GoodSN) as name:
        assert registry.regularizers[name] is GoodSN and GoodSN().name == name
    assert {kind: dict(registry.kinds[kind]) for kind in PLUGIN_KINDS} == before
    assert "name" not in vars(GoodSN) and GoodSN().name == "GoodSN"
    hinge = registry.losses["hinge"]
    with testing.registered(hinge) as name:  # already registered: used as it is
        assert name == "hinge"


def test_check_plugin_reports_every_failure_at_once():
    assert "check_loss_is_a_batch_mean" in testing.check_plugin(Hinge)
    with pytest.raises(ConformanceError) as info:
        testing.check_plugin(SummedHinge)
    message = str(info.value)
    assert message.startswith("1 check(s) failed")
    assert "losses/SummedHinge: check_loss_is_a_batch_mean" in message
    assert "the contract: Each loss is a mean over the batch" in message


# ---------------------------------------------------------------------------------------------
# Minimal correct plugins (positive controls) and broken ones
# ---------------------------------------------------------------------------------------------


class PowerIteration(nn.Module):
    """``W / sigma(W)``, sigma by one power-iteration step per training forward while state
    updates are enabled (Miyato et al. 2018, Algorithm 1)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("u", F.normalize(torch.randn(weight.shape[0]), dim=0))

    def update(self) -> bool:
        return self.training and state_updates_enabled()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        m = weight_matrix(weight)
        if self.update():
            with torch.no_grad():
                self.u.copy_(F.normalize(m @ F.normalize(m.T @ self.u, dim=0), dim=0))
        u = self.u.clone()
        v = F.normalize(m.T @ u, dim=0)
        return weight / (u @ m @ v)


class GoodSN(Regularizer):
    """Spectral normalization (Miyato et al. 2018) in 20 lines: the kit's positive control."""

    @attrs.define
    class Config:
        pass

    parametrization = PowerIteration
    types: tuple = (nn.Conv2d, nn.Linear, nn.Embedding)

    def apply(self, module):
        for _, layer in list(weight_layers(module, self.types)):
            parametrize.register_parametrization(layer, "weight", self.parametrization(layer.weight))
        return module


class AlwaysUpdates(PowerIteration):
    def update(self) -> bool:
        return True  # ignores eval mode and frozen_state()


class UpdatesEveryMicroBatch(PowerIteration):
    def update(self) -> bool:
        return self.training  # ignores frozen_state() only


class SNUpdatingInEval(GoodSN):
    """Updates its power iteration in eval mode too."""

    parametrization = AlwaysUpdates


class SNUpdatingPerMicroBatch(GoodSN):
    """Updates its power iteration in every micro-batch (ignores frozen_state)."""

    parametrization = UpdatesEveryMicroBatch


class ConvOnlySN(GoodSN):
    """Normalizes only the convolutions."""

    types = (nn.Conv2d,)


class SNWithLazyState(GoodSN):
    """Creates state at its first ``after_step`` (a running maximum of s1, as SR-d records
    gamma): a freshly built model lacks it and cannot load a checkpoint."""

    def after_step(self, module, iteration):
        for _, layer in weight_layers(module):
            sn = layer.parametrizations.weight[0]
            s1 = torch.linalg.matrix_norm(weight_matrix(layer.parametrizations.weight.original), 2)
            if not hasattr(sn, "max_s1"):
                sn.register_buffer("max_s1", s1.clone())
            sn.max_s1.copy_(torch.maximum(sn.max_s1, s1))


class HalvesOnceInPython(GoodSN):
    """Halves the weights at its first ``after_step``, remembering that in a Python attribute
    (lost on resume: the resumed run halves them again)."""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.done = False

    def after_step(self, module, iteration):
        if not self.done:
            for _, layer in weight_layers(module):
                layer.parametrizations.weight.original.mul_(0.5)
            self.done = True


class NoisyProjection(GoodSN):
    """Adds noise from the global random stream after each step (differs between processes)."""

    def after_step(self, module, iteration):
        for _, layer in weight_layers(module):
            w = layer.parametrizations.weight.original
            w.add_(1e-3 * torch.randn_like(w))


class NaNPenalty(GoodSN):
    """Returns a NaN loss term (contract v1's loss_term, reached through the default penalty)."""

    def loss_term(self, module, iteration):
        return next(module.parameters()).sum() * math.nan


class GoodR1(Regularizer):
    """R1 (Mescheder et al. 2018, eq. 9) in a few lines, lazy every 2 steps: the positive control
    of a data-dependent penalty."""

    @attrs.define
    class Config:
        gamma: float = 1.0

    needs = frozenset({"real_grad"})
    penalty_every = 2

    def apply(self, module):
        return module

    def penalty(self, context):
        if context.phase != "D":
            return None
        (grad,) = torch.autograd.grad(context.real_logits.sum(), context.real, create_graph=True)
        return self.config.gamma / 2 * grad.square().flatten(1).sum(1).mean()


class DetachedR1(GoodR1):
    """Takes the input gradient without create_graph: the penalty reaches no parameter."""

    def penalty(self, context):
        if context.phase != "D":
            return None
        (grad,) = torch.autograd.grad(context.real_logits.sum(), context.real, retain_graph=True)
        return grad.square().flatten(1).sum(1).mean()


class LastLayerPenalty(GoodR1):
    """Depends on the batch (through the reals, detached), but reaches only D's last linear
    layer."""

    needs = frozenset()

    def penalty(self, context):
        if context.phase != "D":
            return None
        last = [m for m in context.module.modules() if isinstance(m, nn.Linear)][-1]
        return last.weight.square().sum() * context.real.detach().square().mean()


class BackwardInPenalty(GoodR1):
    """Back-propagates its own penalty (the loop's scaling by 1/k and every never applies)."""

    def penalty(self, context):
        value = super().penalty(context)
        if value is not None:
            value.backward(retain_graph=True)
        return value


class FirstMicroBatchOnly(GoodR1):
    """Computes its penalty on the first micro-batch only, times their number (a k-fold weight on
    half the data)."""

    def penalty(self, context):
        if context.micro_batch > 0:
            return None
        value = super().penalty(context)
        return None if value is None else value * context.num_micro_batches


class UnknownNeeds(GoodR1):
    """Asks the loop for something it does not prepare."""

    needs = frozenset({"real_grad", "fake_grad"})


class ZeroEvery(GoodR1):
    """A lazy interval of 0."""

    penalty_every = 0


class ForgetsItsState(GoodR1):
    """Keeps a step count in its own state_dict, but ignores load_state_dict."""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.count = torch.zeros((), dtype=torch.int64)

    def penalty(self, context):
        self.count += 1
        return super().penalty(context)

    def state_dict(self):
        return {"count": self.count.clone()}


class InterpolatesPerProcess(GoodR1):
    """A WGAN-GP-style penalty whose interpolation weights come from a generator seeded by
    (step, micro-batch, process): they depend on how the batch is split."""

    needs = frozenset()
    penalty_every = 1

    def penalty(self, context):
        if context.phase != "D":
            return None
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        seed = 1000 * context.step + 10 * context.micro_batch + rank
        eps = torch.rand(len(context.real), 1, 1, 1, generator=torch.Generator().manual_seed(seed))
        x = (eps * context.real + (1 - eps) * context.fake).detach().requires_grad_()
        (grad,) = torch.autograd.grad(context.discriminator(x, context.real_labels).sum(), x,
                                      create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).square().mean()


class Hinge(Loss):
    """The hinge loss (Lim & Ye 2017)."""

    @attrs.define
    class Config:
        pass

    def discriminator_loss(self, real, fake):
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()

    def generator_loss(self, fake, real_logits=None):
        return -fake.mean()


class SwappedHinge(Hinge):
    """Real and fake swapped."""

    def discriminator_loss(self, real, fake):
        return super().discriminator_loss(fake, real)


class SummedHinge(Hinge):
    """Sums over the batch instead of averaging."""

    def discriminator_loss(self, real, fake):
        return F.relu(1 - real).sum() + F.relu(1 + fake).sum()


class UndocumentedHinge(Hinge):
    pass


class V1Hinge(Hinge):
    """The generator loss of contract v1: no ``real_logits`` parameter."""

    def generator_loss(self, fake):
        return -fake.mean()


class RelativisticIgnoringReals(Hinge):
    """Declares it needs real logits, never uses them."""

    needs_real_logits = True


class UsesUndeclaredReals(Hinge):
    """Uses real logits without declaring needs_real_logits (the loop would never pass them)."""

    def generator_loss(self, fake, real_logits=None):
        shift = 0.0 if real_logits is None else real_logits.mean()
        return -(fake - shift).mean()


class GoodRaHinge(Hinge):
    """Relativistic average hinge (Jolicoeur-Martineau 2019, RaHingeGAN): the positive control
    of a loss that needs real logits."""

    needs_real_logits = True

    def discriminator_loss(self, real, fake):
        return F.relu(1 - (real - fake.mean())).mean() + F.relu(1 + (fake - real.mean())).mean()

    def generator_loss(self, fake, real_logits=None):
        return (F.relu(1 + (real_logits - fake.mean())).mean()
                + F.relu(1 - (fake - real_logits.mean())).mean())


class SummedRaHinge(GoodRaHinge):
    """Sums the relativistic terms over the batch."""

    def discriminator_loss(self, real, fake):
        return F.relu(1 - (real - fake.mean())).sum() + F.relu(1 + (fake - real.mean())).sum()


class IntKeysConfigHinge(Hinge):
    """A Config field TOML cannot hold (a table with integer keys)."""

    @attrs.define
    class Config:
        weights: dict[int, float] = attrs.Factory(lambda: {1: 0.5})


class TinyG(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3 * 8 * 8)
        self.scale = scale

    def forward(self, z, y=None):
        return self.scale * torch.tanh(self.fc(z)).view(-1, 3, 8, 8)


class TinyD(nn.Module):
    def __init__(self, cached: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 1)
        self.cached = cached
        if cached:
            self.kernel = self.conv.weight  # bypasses any parametrization registered later

    def forward(self, x, y=None):
        weight = self.kernel if self.cached else self.conv.weight
        h = F.leaky_relu(F.conv2d(x, weight, self.conv.bias, padding=1), 0.2)
        return self.fc(h.flatten(1)).squeeze(1)


class TinyArchitecture(Architecture):
    """An 8x8 linear generator and a one-convolution discriminator: the positive control."""

    @attrs.define
    class Config:
        num_classes: int = 0

    resolution = 8
    z_dim = 16
    g_scale = 1.0
    cached = False

    def build_generator(self):
        return TinyG(self.g_scale)

    def build_discriminator(self):
        return TinyD(self.cached)


class OutOfRange(TinyArchitecture):
    """Images in [-3, 3]."""

    g_scale = 3.0


class IgnoresLabels(TinyArchitecture):
    """Claims 3 classes, ignores the labels."""

    @attrs.define
    class Config:
        num_classes: int = 3


class CachedKernel(TinyArchitecture):
    """D's forward uses a reference to its kernel taken at construction."""

    cached = True


class ConstantMetric(Metric):
    """A constant score with its protocol."""

    primary = "score"
    higher_is_better = True

    @attrs.define
    class Config:
        pass

    def compute(self, context):
        images = torch.cat(list(context.generate(8)))
        return MetricResult({"score": float(images.mean())}, {"samples": 8})


class NoProtocol(ConstantMetric):
    """Forgets the protocol."""

    def compute(self, context):
        return MetricResult(super().compute(context).values)


class RandomScore(ConstantMetric):
    """Draws its score from the unseeded global random stream."""

    def compute(self, context):
        return MetricResult({"score": float(torch.rand(()))}, {"samples": 0})


class Noise(Dataset):
    """Embedded random images in [-1, 1] with labels 0..3 (fixed by a seed)."""

    @attrs.define
    class Config:
        scale: float = 1.0

    resolution = 8

    def build(self, root, split="train"):
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(10, 3, 8, 8, generator=g) * 2 - 1) * self.config.scale
        labels = torch.randint(0, 4, (10,), generator=g)
        return [(images[i], int(labels[i])) for i in range(10)]


class Unscaled(Noise):
    """Pixels in [0, 255]."""

    @attrs.define
    class Config:
        scale: float = 255.0


class CrashesWithoutFiles(Noise):
    """Raises a bare FileNotFoundError when its files are missing."""

    def build(self, root, split="train"):
        raise FileNotFoundError(Path(root) / "noise" / "images.npy")


class ReportsMissingFiles(Noise):
    """Raises DataMissingError naming the folder, and reads prepared files."""

    def build(self, root, split="train"):
        folder = Path(root) / "noise"
        if not (folder / "ok").is_file():
            from core.errors import DataMissingError
            raise DataMissingError(f"noise: no files in {folder}")
        return super().build(root, split)


class OffGridDequantized(Noise):
    """Asks the loop to dequantize, but its pixels are not 8-bit levels."""

    dequantize = True


class PreparesSecretly(Noise):
    """Implements prepare without supports_prepare (core.prepare would never offer it)."""

    def prepare(self, root, split="train", workers=0, force=False, progress=True):
        return {"count": 10, "resolution": 8}


class PrepareCrashesWithoutFiles(ReportsMissingFiles):
    """Supports prepare, but a missing folder crashes it with a bare FileNotFoundError."""

    supports_prepare = True

    def prepare(self, root, split="train", workers=0, force=False, progress=True):
        return {"count": len((Path(root) / "noise").iterdir()), "resolution": 8}


GOOD = [GoodSN, GoodR1, Hinge, GoodRaHinge, TinyArchitecture, ConstantMetric, Noise,
        Case(ReportsMissingFiles, prepare=lambda root: (root / "noise").mkdir() or
             (root / "noise" / "ok").touch())]


@parametrize_with_checks(GOOD)
def test_minimal_correct_plugins_pass_every_check(plugin, check):
    check(plugin)


#: (broken plugin, the check that must catch it, a phrase of its message)
BROKEN = [
    (ConvOnlySN, "check_regularizer_applies_to_every_layer_type", "linear: linear; embedding"),
    (SNUpdatingInEval, "check_regularizer_eval_mode_changes_no_state", "eval mode changed state"),
    (SNUpdatingPerMicroBatch, "check_regularizer_eval_mode_changes_no_state", "frozen_state"),
    (SNUpdatingPerMicroBatch, "check_regularizer_acts_once_per_optimizer_step", "micro-batches"),
    (SNWithLazyState, "check_regularizer_state_dict_round_trip", "does not load"),
    (HalvesOnceInPython, "check_regularizer_state_dict_round_trip", "next training step"),
    (HalvesOnceInPython, "check_regularizer_checkpoint_resume", "differs from a straight run"),
    (NaNPenalty, "check_regularizer_finite_outputs_and_gradients", "non-finite"),
    (DetachedR1, "check_regularizer_penalty_reaches_discriminator", "without a gradient"),
    (LastLayerPenalty, "check_regularizer_penalty_reaches_discriminator",
     "missing, zero or non-finite for D's weights"),
    (BackwardInPenalty, "check_regularizer_penalty_reaches_discriminator",
     "filled parameters' .grad itself"),
    (UnknownNeeds, "check_regularizer_penalty_reaches_discriminator", "['fake_grad']"),
    (FirstMicroBatchOnly, "check_regularizer_penalty_micro_batches_equal_one_batch",
     "differ between 1 micro-batch of 8 and 2 of 4"),
    (ZeroEvery, "check_regularizer_acts_once_per_optimizer_step",
     "penalty_every must be an integer >= 1"),
    (ForgetsItsState, "check_regularizer_own_state_round_trip", "does not give the state back"),
    (SwappedHinge, "check_loss_sign_conventions", "is not below"),
    (SwappedHinge, "check_loss_gradients", "d(L_D)/d(real) must be <= 0"),
    (SummedHinge, "check_loss_is_a_batch_mean", "not batch means"),
    (SummedRaHinge, "check_loss_is_a_batch_mean", "vs the batch twice"),
    (V1Hinge, "check_loss_real_logits", "must accept real_logits"),
    (RelativisticIgnoringReals, "check_loss_real_logits", "does not depend on real_logits"),
    (UsesUndeclaredReals, "check_loss_real_logits", "changes with real_logits"),
    (UndocumentedHinge, "check_documented", "no docstring"),
    (IntKeysConfigHinge, "check_config_round_trip", "cannot be written as TOML"),
    (OutOfRange, "check_architecture_shapes_and_range", "in [-1, 1]"),
    (IgnoresLabels, "check_architecture_conditional_labels", "do not depend on the labels"),
    (CachedKernel, "check_architecture_layers_reported", "weight of conv did not change"),
    (NoProtocol, "check_metric_protocol_record", "protocol is empty"),
    (RandomScore, "check_metric_deterministic", "differ"),
    (Unscaled, "check_dataset_items", "pixels must be in [-1, 1]"),
    (CrashesWithoutFiles, "check_dataset_missing_data_is_reported", "DataMissingError"),
    (OffGridDequantized, "check_dataset_items", "not p / 127.5 - 1 of 8-bit values"),
    (PreparesSecretly, "check_dataset_prepare", "supports_prepare is False"),
    (PrepareCrashesWithoutFiles, "check_dataset_prepare", "must raise core.errors.DataMissing"),
]


@pytest.mark.parametrize(("plugin", "check_name", "phrase"), BROKEN,
                         ids=[f"{p.__name__}-{c}" for p, c, _ in BROKEN])
def test_broken_plugin_fails_the_check_that_guards_it(plugin, check_name, phrase):
    (check,) = [c for c in testing.checks_for(plugin) if c.name == check_name]
    with pytest.raises(ConformanceError) as info:
        check(plugin)
    assert phrase in str(info.value)
    assert str(info.value).startswith(f"{testing.as_case(plugin).id}: {check_name}: ")


def test_noisy_projection_is_deterministic_under_a_seed_yet_inconsistent_across_processes():
    checks = {c.name: c for c in testing.checks_for(NoisyProjection)}
    checks["check_regularizer_deterministic_under_seed"](NoisyProjection)
    with pytest.raises(ConformanceError, match="differ between the 2 processes"):
        checks["check_regularizer_consistent_across_processes"](NoisyProjection)


@pytest.mark.slow
def test_interpolates_drawn_per_process_fail_the_ddp_and_micro_batch_checks():
    checks = {c.name: c for c in testing.checks_for(InterpolatesPerProcess)}
    with pytest.raises(ConformanceError, match="2 DDP processes and one process"):
        checks["check_regularizer_ddp_matches_one_process"](InterpolatesPerProcess)
    with pytest.raises(ConformanceError, match="differ between 1 micro-batch of 8 and 2"):
        checks["check_regularizer_penalty_micro_batches_equal_one_batch"](InterpolatesPerProcess)


def test_a_dataset_without_files_and_without_prepare_is_skipped_with_the_reason():
    (check,) = [c for c in testing.checks_for(ReportsMissingFiles) if c.name == "check_dataset_items"]
    with pytest.raises(pytest.skip.Exception, match=r"needs files; give Case\(prepare=...\)"):
        check(ReportsMissingFiles)


def test_a_metric_missing_its_weights_fails_with_the_user_facing_message(tmp_path):
    fid = get_registry().metrics["fid"]
    case = Case(fid(fid.Config(num_samples=8, reference_samples=8, download=False)),
                root=tmp_path, id="fid-without-weights")
    (check,) = [c for c in testing.checks_for(case) if c.name == "check_metric_protocol_record"]
    with pytest.raises(ConformanceError, match="Case\\(prepare=...\\).*weights file is missing"):
        check(case)
