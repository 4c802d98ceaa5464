"""One evaluation generates its samples once (issue 15): the metrics of one
:func:`core.eval.runner.evaluate` call share one set of generated samples and the features they
compute from them, with the scores each metric has on its own.

The generator is a real (small) resnet32 G; its forward calls are counted with a forward hook.
"The scores on its own" are ``metric.compute(context)`` on a context without a sample cache,
which is how every metric generated before the cache existed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from core.eval.runner import SampleCache, evaluate
from core.interfaces import EvaluationContext
from core.registry import get_registry
from plugins.datasets.stacked_digits import StackedDigits
from plugins.metrics import digit_classifier as dc
from plugins.metrics.d_stats import DStats
from plugins.metrics.fid import Fid
from plugins.metrics.inception import WEIGHTS_ENV
from plugins.metrics.inception_score import InceptionScore
from plugins.metrics.modes import DigitsFid, Modes

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notices


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root whose digit classifier is trained once for the module."""
    path = tmp_path_factory.mktemp("data")
    dc._LOADED.clear()
    dc.load_digit_classifier(path, verbose=False)
    return path


def make_context(root, num_classes: int = 0, batch_size: int = 100, seed: int = 3
                 ) -> EvaluationContext:
    cls = get_registry().architectures["resnet32"]
    arch = cls(cls.Config(ch=8, g_ch=8, num_classes=num_classes))
    torch.manual_seed(0)
    G, D = arch.build_generator(), arch.build_discriminator()
    return EvaluationContext(generator=G, architecture=arch,
                             dataset=StackedDigits(StackedDigits.Config(num_samples=600)),
                             data_root=root, device=torch.device("cpu"), seed=seed,
                             batch_size=batch_size, discriminator=D, show_progress=False)


class CountCalls:
    """Forward calls of a module and the samples they produced (a forward hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.sizes: list[int] = []
        self._handle = module.register_forward_hook(lambda m, i, out: self.sizes.append(len(out)))

    def close(self) -> None:
        self._handle.remove()


def alone(metrics, context) -> list[dict[str, float]]:
    assert context.sample_cache is None
    return [m.compute(context).values for m in metrics]


def shared(metrics, context) -> list[dict[str, float]]:
    return [record["values"] for record in evaluate(metrics, context)]


def assert_same_scores(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert (math.isnan(x[key]) and math.isnan(y[key])) or x[key] == y[key], key


def test_quickstart_metrics_generate_once_with_the_same_scores(root):
    """modes + digits_fid (+ d_stats) on the same samples: one generation, identical scores;
    250 samples in batches of 100 (a partial last batch)."""
    context = make_context(root)
    metrics = [Modes(Modes.Config(num_samples=250)),
               DigitsFid(DigitsFid.Config(num_samples=250, reference_samples=300)),
               DStats(DStats.Config(num_samples=250))]
    counter = CountCalls(context.generator)
    expected = alone(metrics, context)
    assert counter.sizes == [100, 100, 50] * 3  # today: every metric generates its own
    counter.sizes.clear()
    got = shared(metrics, context)
    assert counter.sizes == [100, 100, 50]  # one generation for the whole evaluation
    counter.close()
    assert_same_scores(got, expected)
    assert context.sample_cache is None  # the cache lives for one evaluate() call
    assert np.isfinite(got[1]["digits_fid"]) and np.isfinite(got[2]["d_gap"])


def test_a_smaller_request_reuses_the_first_batches_of_a_larger_one(root):
    """Different num_samples: the full batches are shared, each batch drawn from the random
    state it has in the seeded stream, so the scores are those of each metric alone."""
    context = make_context(root)
    metrics = [Modes(Modes.Config(num_samples=250)),
               DigitsFid(DigitsFid.Config(num_samples=400, reference_samples=300)),
               Modes(Modes.Config(num_samples=400)), Modes(Modes.Config(num_samples=120))]
    counter = CountCalls(context.generator)
    expected = alone(metrics, context)
    counter.sizes.clear()
    got = shared(metrics, context)
    # 250: (0,100) (100,100) (200,50); 400 adds (200,100) (300,100); 120 adds (100,20)
    assert counter.sizes == [100, 100, 50, 100, 100, 20]
    counter.close()
    assert_same_scores(got, expected)


def test_generation_stays_deterministic_in_the_seed(root):
    """Through the cache, ``generate(n)`` yields exactly what it yields without one, for every
    n and in any order of requests; another seed starts the cache afresh."""
    context = make_context(root, batch_size=64)
    fresh = {n: torch.cat(list(context.generate(n))) for n in (150, 100, 64)}
    context.sample_cache = SampleCache()
    try:
        got = {n: torch.cat(list(context.generate(n))) for n in (150, 100, 64)}
        labels = [y for _, y in context.generate_with_labels(150)]
        context.seed = 4
        other = torch.cat(list(context.generate(150)))
    finally:
        context.sample_cache = None
    for n in fresh:
        assert torch.equal(got[n], fresh[n]), n
    assert torch.equal(fresh[100][:64], fresh[150][:64])  # the shared first batch
    assert labels == [None, None, None]
    assert not torch.allclose(other, fresh[150])
    assert torch.equal(other, torch.cat(list(context.generate(150))))  # seed 4, no cache


def test_conditional_labels_come_with_their_images(root):
    """d_stats on a conditional G: the labels yielded are those the generator was given."""
    context = make_context(root, num_classes=1000)  # the dataset labels: 1000 modes
    rng = torch.Generator().manual_seed(context.seed)
    expected_labels = [context.architecture.sample_latents(n, rng)[1] for n in (100, 100, 50)]
    metrics = [DStats(DStats.Config(num_samples=250)), Modes(Modes.Config(num_samples=250))]
    expected = alone(metrics, context)
    counter = CountCalls(context.generator)
    got = shared(metrics, context)
    assert counter.sizes == [100, 100, 50]
    counter.close()
    assert_same_scores(got, expected)
    context.sample_cache = SampleCache()
    try:
        pairs = list(context.generate_with_labels(250))
    finally:
        context.sample_cache = None
    for (images, y), want in zip(pairs, expected_labels):
        assert torch.equal(y, want)
    with torch.no_grad():  # image i is G(z_i, y_i)
        rng = torch.Generator().manual_seed(context.seed)
        z, y = context.architecture.sample_latents(100, rng)
        assert torch.equal(pairs[0][1], y)
        context.generator.eval()
        torch.testing.assert_close(pairs[0][0], context.generator(z, y).clamp(-1, 1))
        context.generator.train()


def test_a_metric_writing_into_its_images_cannot_change_another_metrics_samples(root):
    context = make_context(root)
    fresh = torch.cat(list(context.generate(200)))
    context.sample_cache = SampleCache()
    try:
        for images in context.generate(200):
            images.mul_(0.0)  # a careless metric
        assert torch.equal(torch.cat(list(context.generate(200))), fresh)
    finally:
        context.sample_cache = None


def test_past_the_image_budget_only_features_are_kept(root):
    """With no room for images, features are still computed once per name; a metric that needs
    the images themselves gets them regenerated, equal to the first time."""
    context = make_context(root)
    cache = SampleCache(image_bytes=0)
    context.sample_cache = cache
    counter = CountCalls(context.generator)
    calls = []

    def feature(images):
        calls.append(len(images))
        return images.mean(dim=(1, 2, 3)).numpy()

    try:
        a = np.concatenate(list(context.features("mean", feature, 250)))
        b = np.concatenate(list(context.features("mean", feature, 250)))
        assert calls == [100, 100, 50] and counter.sizes == [100, 100, 50]
        first = torch.cat(list(context.generate(250)))
        second = torch.cat(list(context.generate(250)))
    finally:
        context.sample_cache = None
        counter.close()
    assert cache.kept_bytes == 0
    assert np.array_equal(a, b)
    assert counter.sizes == [100, 100, 50] * 3  # features once, then images twice
    assert torch.equal(first, second)
    np.testing.assert_array_equal(a, first.mean(dim=(1, 2, 3)).numpy())


def test_the_image_budget_is_bytes_of_float32_images(root):
    context = make_context(root)
    per_batch = 100 * 3 * 32 * 32 * 4
    cache = SampleCache(image_bytes=2 * per_batch)
    context.sample_cache = cache
    try:
        list(context.generate(300))
    finally:
        context.sample_cache = None
    assert cache.kept_bytes == 2 * per_batch  # the first two batches kept, the third not


# ---------------------------------------------------------------------------------------------
# Inception metrics share the same samples and features (a tiny TorchScript stand-in network)
# ---------------------------------------------------------------------------------------------


class TinyInception(nn.Module):
    """clean-fid's TorchScript Inception interface (``layers`` -> 2048, ``output`` -> 1008)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                    nn.Linear(64, 2048), nn.ReLU())
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float(), size=(299, 299), mode="bilinear",
                                            align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        return torch.softmax(self.output(features), dim=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyInception().eval()
    with torch.no_grad():
        net.output.weight.mul_(50.0)
    path = tmp_path_factory.mktemp("weights") / "tiny-inception.pt"
    torch.jit.script(net).save(str(path))
    return path


def test_is_and_the_digit_metrics_share_one_generation(root, tiny_weights, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_weights))
    context = make_context(root)
    metrics = [InceptionScore(InceptionScore.Config(num_samples=200, splits=2)),
               Modes(Modes.Config(num_samples=200)),
               InceptionScore(InceptionScore.Config(num_samples=100, splits=2))]
    expected = alone(metrics, context)
    counter = CountCalls(context.generator)
    got = shared(metrics, context)
    assert counter.sizes == [100, 100]
    counter.close()
    assert_same_scores(got, expected)
    assert got[0]["is"] > 1.0


@pytest.mark.slow  # clean-fid's 2048x2048 matrix square root: ~15 s
def test_fid_is_and_the_digit_metrics_share_one_generation(root, tiny_weights, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_weights))
    context = make_context(root)
    metrics = [Fid(Fid.Config(num_samples=200, reference_samples=200)),
               InceptionScore(InceptionScore.Config(num_samples=200, splits=2)),
               Modes(Modes.Config(num_samples=200)),
               DigitsFid(DigitsFid.Config(num_samples=200, reference_samples=300)),
               DStats(DStats.Config(num_samples=200))]
    expected = alone(metrics, context)
    counter = CountCalls(context.generator)
    got = shared(metrics, context)
    assert counter.sizes == [100, 100]
    counter.close()
    assert_same_scores(got, expected)
