"""Metric plugins and the evaluation core: numbers checked against independent computations.

The real Inception weights cannot be downloaded here, so the Inception tests build a small
TorchScript network with the same interface (``layers`` to 2048 pool features, an ``output``
layer of 1008 logits, a ``forward`` that resizes inside for the legacy mode) and load it through
the very same weights-path mechanism; only the file differs.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url as CLEANFID_URL
from cleanfid.fid import fid_from_feats, frechet_distance
from cleanfid.resize import build_resizer
from torch import nn

from core.errors import DataMissingError, SpecregError, WeightsMissingError
from core.eval.runner import evaluate, format_table
from core.interfaces import Architecture, EvaluationContext
from core.registry import get_registry
from plugins.datasets.stacked_digits import StackedDigits, digit_pool, render
from plugins.metrics import digit_classifier as dc
from plugins.metrics.d_stats import DStats
from plugins.metrics.fid import Fid, fid_from_features
from plugins.metrics.inception import WEIGHTS_ENV, InceptionExtractor, InceptionSettings, \
    inception_extractor
from plugins.metrics.inception_score import InceptionScore, inception_score
from plugins.metrics.modes import DigitsFid, Modes, mode_coverage
from plugins.metrics.reference import published_statistics

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notices


# ---------------------------------------------------------------------------------------------
# Test networks, generators, contexts
# ---------------------------------------------------------------------------------------------


class TinyInception(nn.Module):
    """Same TorchScript interface as clean-fid's Inception, a few thousand times smaller."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                    nn.Linear(64, 2048), nn.ReLU())
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyInception().eval()
    with torch.no_grad():  # output weights large enough that IS is not trivially 1
        net.output.weight.mul_(50.0)
    path = tmp_path_factory.mktemp("weights") / "tiny-inception.pt"
    torch.jit.script(net).save(str(path))
    return path, net


class Arch(Architecture):
    """An Architecture whose latents are ``z_dim`` standard normals (and labels if asked)."""

    def __init__(self, z_dim: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self._z_dim, self._classes = z_dim, num_classes

    @property
    def resolution(self) -> int:
        return 32

    @property
    def z_dim(self) -> int:
        return self._z_dim

    @property
    def num_classes(self) -> int:
        return self._classes


class RealDigits(nn.Module):
    """Real stacked digits: latent coordinate c picks channel c's digit from the train pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.from_numpy(digit_pool("train")[0])
        self.calls = 0

    def forward(self, z, y=None):
        self.calls += 1
        idx = (torch.special.ndtr(z[:, :3]) * len(self.pool)).long().clamp(0, len(self.pool) - 1)
        return render(self.pool[idx])


class Constant(nn.Module):
    """Always the same stacked digit (total mode collapse)."""

    def forward(self, z, y=None):
        pool = torch.from_numpy(digit_pool("train")[0])
        return render(pool[[3, 50, 700]][None]).expand(len(z), -1, -1, -1)


class Noise(nn.Module):
    """Pure noise: uniform in [-1, 1] per pixel, from a 3*32*32-dimensional latent."""

    def forward(self, z, y=None):
        return (2 * torch.special.ndtr(z) - 1).reshape(-1, 3, 32, 32)


class NoisyBlue(nn.Module):
    """Real digits in R and G, noise painted into B."""

    def forward(self, z, y=None):
        pool = torch.from_numpy(digit_pool("train")[0])
        idx = (torch.special.ndtr(z[:, :2]) * len(pool)).long().clamp(0, len(pool) - 1)
        images = render(torch.cat([pool[idx], torch.zeros(len(z), 1, 8, 8)], dim=1))
        images[:, 2] = (2 * torch.special.ndtr(z[:, 2:2 + 32 * 32]) - 1).reshape(-1, 32, 32)
        return images


def context(generator, root, z_dim=3, dataset_samples=2000, num_classes=0, **kw):
    dataset = StackedDigits(StackedDigits.Config(num_samples=dataset_samples))
    return EvaluationContext(generator=generator, architecture=Arch(z_dim, num_classes),
                             dataset=dataset, data_root=root, device=torch.device("cpu"), batch_size=500,
                             show_progress=False, **kw)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """A data root whose digit classifier is trained once for the module."""
    root = tmp_path_factory.mktemp("data")
    dc._LOADED.clear()
    dc.load_digit_classifier(root)
    return root


# ---------------------------------------------------------------------------------------------
# FID and IS: the numbers
# ---------------------------------------------------------------------------------------------


def test_fid_equals_cleanfid_and_an_independent_float64_computation():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 24))
    b = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) * 0.5 + 0.3
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(fid_from_feats(a, b), rel=1e-10)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert ours == pytest.approx(frechet_distance(mu_a, sa, mu_b, sb), rel=1e-10)
    # independent: Tr sqrt(Sa Sb) = Tr sqrt(Sa^1/2 Sb Sa^1/2), via symmetric eigendecompositions
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root @ sb @ root)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb) \
        - 2 * np.sum(np.sqrt(np.clip(middle, 0, None)))
    assert ours == pytest.approx(expected, rel=1e-8)


def test_inception_score_equals_a_direct_float64_computation():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((1000, 30)) * 3).astype(np.float32)
    mean, std = inception_score(logits, splits=10)
    p = torch.softmax(torch.from_numpy(logits).double(), dim=1)
    scores = []
    for part in torch.chunk(p, 10):  # 1000 / 10: the same slices
        marginal = part.mean(0, keepdim=True)
        kl = F.kl_div(marginal.log().expand_as(part), part, reduction="none").sum(1).mean()
        scores.append(math.exp(kl.item()))
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    # a classifier certain of one class per sample, classes uniform: IS = number of classes
    one_hot = np.eye(20)[np.arange(1000) % 20] * 100.0
    assert inception_score(one_hot, splits=10)[0] == pytest.approx(20.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Inception weights: where they come from, and when they are missing
# ---------------------------------------------------------------------------------------------


def test_missing_weights_without_download_name_file_url_and_where_to_put_it(tmp_path):
    settings = InceptionSettings(inception_weights=str(tmp_path / "nets" / "inc.pt"),
                                 download=False)
    with pytest.raises(WeightsMissingError) as info:
        inception_extractor(settings, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "nets" / "inc.pt") in message
    assert CLEANFID_URL in message
    assert WEIGHTS_ENV in message and "inception_weights" in message


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "root" / ".cache" / "inception" / "inception-2015-12-05.pt"
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    url = (tmp_path / "no-such-mirror" / "inception.pt").as_uri()
    with pytest.raises(WeightsMissingError) as info:  # default path under the data root
        inception_extractor(InceptionSettings(inception_url=url), tmp_path / "root")
    assert str(target) in str(info.value) and url in str(info.value)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_download_failing_after_the_transfer_leaves_no_partial_file(tmp_path, tiny_weights):
    source, _ = tiny_weights
    target = tmp_path / "inception.pt"
    target.mkdir()  # the transfer succeeds, putting the file in place fails
    with pytest.raises(WeightsMissingError, match="Downloading it failed"):
        inception_extractor(InceptionSettings(inception_weights=str(target),
                                              inception_url=source.as_uri()), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["inception.pt"]


def test_weights_download_env_variable_and_recipe_key(tmp_path, monkeypatch, tiny_weights):
    source, _ = tiny_weights
    # download (from a local mirror URL) into the default place under the data root
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    ex = inception_extractor(InceptionSettings(inception_url=source.as_uri()), tmp_path)
    target = tmp_path / ".cache" / "inception" / "inception-2015-12-05.pt"
    assert ex.path == target and target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    # the environment variable, then the recipe key, which wins
    monkeypatch.setenv(WEIGHTS_ENV, str(source))
    assert inception_extractor(InceptionSettings(download=False), tmp_path / "x").path == source
    other = tmp_path / "copy.pt"
    other.write_bytes(source.read_bytes())
    ex = inception_extractor(InceptionSettings(inception_weights=str(other), download=False),
                             tmp_path)
    assert ex.path == other and ex.sha256 == inception_extractor(
        InceptionSettings(download=False), tmp_path).sha256


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "inception-2015-12-05.pt"
    bad.write_bytes(b"<html>not a network</html>")
    with pytest.raises(WeightsMissingError, match="could not be loaded"):
        inception_extractor(InceptionSettings(inception_weights=str(bad)), tmp_path)


def test_bad_mode_is_a_user_error():
    with pytest.raises(SpecregError, match="legacy_tensorflow"):
        Fid(Fid.Config(mode="tensorflow"))


# ---------------------------------------------------------------------------------------------
# The Inception pipeline end to end (generator -> resize -> network -> score)
# ---------------------------------------------------------------------------------------------


def _manual_features(images: torch.Tensor, net: TinyInception) -> np.ndarray:
    """clean-fid's clean path spelled out: [0, 255], PIL bicubic to 299, (x - 128) / 128."""
    resize = build_resizer("clean")
    x255 = ((images.double() + 1) * 127.5).clamp(0, 255).float()
    resized = np.stack([resize(im.permute(1, 2, 0).numpy()) for im in x255])
    with torch.no_grad():
        out = net.layers((torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128)
    return out.reshape(len(images), 2048).numpy()


def test_is_end_to_end_through_the_weights_mechanism(tmp_path, monkeypatch, tiny_weights):
    path, net = tiny_weights
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    ctx = context(RealDigits(), tmp_path)
    (record,) = evaluate([InceptionScore(InceptionScore.Config(num_samples=120, splits=3))], ctx)
    feats = _manual_features(torch.cat(list(ctx.generate(120))), net)
    logits = feats.astype(np.float64) @ net.output.weight.detach().double().numpy().T
    expected, expected_std = inception_score(logits, splits=3)
    assert record["values"]["is"] == pytest.approx(expected, rel=1e-4)
    assert record["values"]["is_std"] == pytest.approx(expected_std, rel=1e-3, abs=1e-6)
    assert record["values"]["is"] > 1.05  # the test network is not trivial
    protocol = record["protocol"]
    assert protocol["samples"] == 120 and protocol["splits"] == 3
    assert protocol["resize_mode"] == "clean" and protocol["feature_network_file"] == str(path)


def test_records_and_table_say_which_published_tables_they_match(tmp_path, monkeypatch,
                                                                  tiny_weights):
    """Issue 11 point 5: each record says, from the settings the score was computed with,
    which published tables it can be set beside and why not the others; the table shows it."""
    path, _ = tiny_weights
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    ctx = context(RealDigits(), tmp_path)
    ctx.dataset = StackedDigits(StackedDigits.Config(num_samples=2000), name="cifar10")
    (record,) = evaluate([InceptionScore(InceptionScore.Config(num_samples=120, splits=3))], ctx)
    assert record["comparable_with"] == record["protocol"]["comparable_with"] == []
    why = record["protocol"]["not_comparable_with"]
    assert set(why) == {"SR Table II", "BSSN Table 1"}
    assert why["SR Table II"] == ("mode 'clean' (paper: 'legacy_tensorflow'); samples 120 "
                                  "(paper: 50000); splits 3 (paper: 10)")
    lines = format_table([record]).splitlines()
    assert lines[0].split()[-2:] == ["comparable", "with"]
    assert all(line.split()[-1] == "-" for line in lines[2:-1])
    # a record whose protocol matched a table shows it, in the record and in the table
    matched = {**record, "comparable_with": ["SR Table II", "BSSN Table 1"]}
    assert all(line.endswith("SR Table II, BSSN Table 1")
               for line in format_table([matched]).splitlines()[2:-1])
    json.dumps(record)


def test_records_of_metrics_without_a_published_protocol_claim_nothing(digits_root):
    ctx = context(Constant(), digits_root)
    (record,) = evaluate([Modes(Modes.Config(num_samples=500))], ctx)
    assert record["comparable_with"] == []


@pytest.mark.slow  # one 2048x2048 matrix square root in clean-fid's frechet_distance: ~15 s
def test_fid_end_to_end_through_the_weights_mechanism(tmp_path, monkeypatch, tiny_weights):
    path, net = tiny_weights
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    gen = RealDigits()
    ctx = context(gen, tmp_path, dataset_samples=1000)  # reference: 200 of 1000 train images
    fid = Fid(Fid.Config(num_samples=200, reference_samples=200))
    inc = InceptionScore(InceptionScore.Config(num_samples=200, splits=2))
    records = evaluate([fid, inc], ctx)
    assert gen.calls == 1  # 200 samples in one batch, generated once for both metrics

    # the same samples and reference images, embedded by hand
    feats = _manual_features(torch.cat(list(ctx.generate(200))), net)
    ref_data = torch.utils.data.Subset(
        ctx.dataset.build(tmp_path, "train"),
        sorted(np.random.default_rng(0).permutation(1000)[:200].tolist()))
    ref_images = torch.stack([ref_data[i][0] for i in range(len(ref_data))])
    ref_feats = _manual_features(ref_images, net)

    cache = next(tmp_path.joinpath(".cache", "reference_stats").glob("*.npz"))
    with np.load(cache) as stored:
        np.testing.assert_allclose(stored["mu"], ref_feats.astype(np.float64).mean(0),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stored["sigma"], np.cov(ref_feats.astype(np.float64),
                                                           rowvar=False), rtol=1e-4, atol=1e-7)

    # expected FID without sqrtm: Tr sqrt(S1 S2) = nuclear norm of A1^T A2 (S = A A^T)
    a1 = (feats - feats.mean(0)).astype(np.float64).T / np.sqrt(len(feats) - 1)
    a2 = (ref_feats - ref_feats.mean(0)).astype(np.float64).T / np.sqrt(len(ref_feats) - 1)
    nuclear = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
    expected = np.sum((feats.mean(0) - ref_feats.mean(0)) ** 2) + np.sum(a1 ** 2) \
        + np.sum(a2 ** 2) - 2 * nuclear
    fid_record, is_record = records
    assert fid_record["values"]["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-4)

    protocol = fid_record["protocol"]
    assert protocol["samples"] == 200 and protocol["resize_mode"] == "clean"
    assert protocol["reference"]["split"] == "train" and protocol["reference"]["samples"] == 200
    assert protocol["reference"]["whole_split"] is False  # 200 of the 1000 training images
    # no published protocol covers the embedded digits: nothing is claimed either way
    assert protocol["comparable_with"] == [] and protocol["not_comparable_with"] == {}
    assert protocol["feature_network_file"] == str(path)
    assert len(protocol["feature_network_sha256"]) == 64
    assert protocol["libraries"]["clean-fid"] and protocol["seed"] == 0
    assert protocol["reference"]["cached"] is False
    json.dumps(records)  # JSON-ready

    # the second time the reference statistics come from the cache
    again = Fid(Fid.Config(num_samples=200, reference_samples=200)).reference(
        ctx, inception_extractor(fid.config, tmp_path))
    assert again.protocol["cached"] is True


def test_legacy_tensorflow_mode_feeds_the_network_unresized(tmp_path, tiny_weights):
    path, net = tiny_weights
    ex = InceptionExtractor(path, "legacy_tensorflow")
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = net((images + 1) * 127.5, return_features=True).numpy()
    np.testing.assert_allclose(ex.features(images), expected, rtol=1e-5, atol=1e-6)
    clean = InceptionExtractor(path, "clean").features(images)
    assert not np.allclose(clean, expected, atol=1e-4)  # a different resize: other features


def test_published_statistics_unavailable_is_a_clear_error():
    with pytest.raises(DataMissingError) as info:
        published_statistics("specreg_no_such_stats", "train", 32, "clean")
    message = str(info.value)
    assert "https://www.cs.cmu.edu/~clean-fid/stats/specreg_no_such_stats_clean_train_32.npz" \
        in message
    target = message.split("and put it at ")[1].split("\n")[0]
    assert not __import__("pathlib").Path(target).exists()


# ---------------------------------------------------------------------------------------------
# Digit classifier and mode coverage
# ---------------------------------------------------------------------------------------------


def test_digit_classifier_accuracy_calibration_and_cache(digits_root, capsys):
    clf = dc.load_digit_classifier(digits_root)
    x_test, y_test = digit_pool("test")
    digits, accepted = clf.classify(torch.from_numpy(x_test))
    accuracy = (digits.numpy() == y_test).mean()
    assert accuracy >= 0.95 and accuracy == pytest.approx(clf.info["heldout_accuracy"])
    rejected = 1 - accepted.numpy().mean()
    assert 0.005 <= rejected <= 0.02 and rejected == pytest.approx(clf.info["heldout_rejected"])
    # the cache holds tensors and JSON only, and loads to the same classifier
    folder = digits_root / ".cache" / "digit_classifier"
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json",
                                                         "classifier.safetensors"]
    dc._LOADED.clear()
    loaded = dc.load_digit_classifier(digits_root)
    assert "held-out accuracy" in capsys.readouterr().out
    assert loaded is not clf and loaded.sha256 == clf.sha256
    assert torch.equal(loaded.classify(torch.from_numpy(x_test))[1], accepted)


def test_digit_classifier_training_is_deterministic(digits_root):
    clf = dc.load_digit_classifier(digits_root)
    again = dc.train_digit_classifier()
    assert again.info["heldout_accuracy"] == clf.info["heldout_accuracy"]
    for a, b in zip(again.net.state_dict().values(), clf.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mode_coverage_counts_and_kl():
    digits = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8, 9]])
    accepted = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=bool)
    out = mode_coverage(digits, accepted)
    assert out["modes"] == 2 and out["rejected"] == 0.25
    p = np.array([2 / 3, 1 / 3])
    assert out["kl"] == pytest.approx(np.sum(p * np.log(p * 1000)))
    assert math.isnan(mode_coverage(digits, np.zeros_like(accepted))["kl"])  # undefined, not inf


def test_modes_real_stacked_digits_cover_all_1000(digits_root):
    result = Modes().compute(context(RealDigits(), digits_root))
    assert result.values["modes"] == 1000
    assert result.values["kl"] < 0.1  # multinomial noise alone gives about 999 / (2 * 10000)
    assert result.values["rejected"] < 0.05


def test_modes_constant_generator_is_one_mode(digits_root):
    result = Modes(Modes.Config(num_samples=2000)).compute(context(Constant(), digits_root))
    assert result.values == {"modes": 1.0, "kl": pytest.approx(math.log(1000)), "rejected": 0.0}


@pytest.mark.parametrize("generator", [Noise(), NoisyBlue()], ids=["noise", "noise-in-blue"])
def test_modes_noise_is_rejected_not_counted(digits_root, generator):
    result = Modes(Modes.Config(num_samples=2000)).compute(
        context(generator, digits_root, z_dim=3 * 32 * 32))
    assert result.values["rejected"] > 0.95
    assert result.values["modes"] <= 0.05 * 2000


def test_digits_fid_against_an_independent_computation(digits_root):
    metric = DigitsFid(DigitsFid.Config(num_samples=2000))
    real = metric.compute(context(RealDigits(), digits_root)).values["digits_fid"]
    const_ctx = context(Constant(), digits_root)
    collapsed = metric.compute(const_ctx)
    assert real < 0.05 * collapsed.values["digits_fid"]
    clf = dc.load_digit_classifier(digits_root)
    gen = torch.cat(list(const_ctx.generate(2000)))
    ref = const_ctx.dataset.build(digits_root, "train").images
    expected = fid_from_feats(clf.image_features(gen), clf.image_features(ref))
    assert collapsed.values["digits_fid"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# d_stats
# ---------------------------------------------------------------------------------------------


class TinyD(nn.Module):
    def __init__(self, conditional: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 1)
        self.embed = nn.Embedding(1000, 1) if conditional else None

    def forward(self, x, y=None):
        out = self.linear(x.flatten(1)).squeeze(1)
        return out if self.embed is None else out + self.embed(y).squeeze(1)


@pytest.mark.parametrize("conditional", [False, True])
def test_d_stats_against_direct_computation(tmp_path, conditional):
    torch.manual_seed(0)
    disc = TinyD(conditional).train()
    ctx = context(RealDigits(), tmp_path, dataset_samples=400, discriminator=disc,
                  num_classes=1000 if conditional else 0)
    values = DStats(DStats.Config(num_samples=300)).compute(ctx).values
    assert disc.training  # mode restored

    def outputs(split, n):
        data = ctx.dataset.build(tmp_path, split)
        order = np.random.default_rng(0).permutation(len(data))[:n] if n < len(data) \
            else np.arange(len(data))
        with torch.no_grad():
            return disc(data.images[np.sort(order)], data.labels[np.sort(order)]
                        if conditional else None).double()

    d_train, d_test = outputs("train", 300), outputs("test", 300)  # test split: 80 images
    rng = torch.Generator().manual_seed(0)
    z, y = ctx.architecture.sample_latents(300, rng)
    with torch.no_grad():
        d_gen = disc(ctx.generator(z, y), y).double()
    loss = torch.relu(1 - d_train) + torch.relu(1 + d_gen)
    for name, v in [("d_train", d_train), ("d_test", d_test), ("d_gen", d_gen), ("loss_d", loss)]:
        assert values[f"{name}_mean"] == pytest.approx(v.mean().item(), rel=1e-5)
        assert values[f"{name}_var"] == pytest.approx(v.var(unbiased=False).item(), rel=1e-4)
    assert values["d_gap"] == pytest.approx(abs(d_train.mean() - d_test.mean()).item(), rel=1e-4)


def test_d_stats_without_discriminator_is_a_user_error(tmp_path):
    with pytest.raises(SpecregError, match="discriminator"):
        DStats().compute(context(RealDigits(), tmp_path, dataset_samples=100))


# ---------------------------------------------------------------------------------------------
# Registry and the evaluation core
# ---------------------------------------------------------------------------------------------


def test_metrics_are_registered():
    metrics = get_registry().metrics
    expected = {"fid": Fid, "is": InceptionScore, "modes": Modes, "digits_fid": DigitsFid,
                "d_stats": DStats}
    for name, cls in expected.items():
        assert metrics[name] is cls and cls.primary
        cls()  # default-constructible


def test_evaluate_records_and_table(digits_root):
    ctx = context(Constant(), digits_root, seed=7, iteration=1234)
    records = evaluate([Modes(Modes.Config(num_samples=1000))], ctx)
    (record,) = json.loads(json.dumps(records))
    assert record["metric"] == "modes" and record["iteration"] == 1234
    assert record["primary"] == "modes" and record["higher_is_better"] is True
    protocol = record["protocol"]
    assert protocol["metric"] == "modes" and protocol["seed"] == 7
    assert protocol["iteration"] == 1234 and protocol["samples"] == 1000
    assert protocol["libraries"]["torch"] == torch.__version__.split("+")[0]
    assert protocol["feature_network_sha256"] == dc.load_digit_classifier(digits_root).sha256
    table = format_table(records)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["iteration", "metric", "score", "value"]
    row = next(line for line in lines if "modes*" in line).split()
    assert row[:4] == ["1234", "modes", "modes*", "1"]
    assert any(line.split()[2] == "kl" and float(line.split()[3]) == pytest.approx(
        math.log(1000), rel=1e-5) for line in lines[2:-1])


def test_an_undefined_score_never_becomes_the_best():
    from core.eval.during_training import is_better
    assert not is_better(math.nan, None, True) and not is_better(math.nan, 1.0, False)
    assert is_better(0.5, 1.0, False) and not is_better(0.5, 1.0, True)


@pytest.mark.parametrize("resolution", [8, 16])
def test_small_stacked_digits_score_as_the_32_pixel_ones(resolution):
    """``dataset.resolution`` 8 / 16: the same digits, so the classifier's 8x8 view is identical."""
    small = StackedDigits(StackedDigits.Config(num_samples=64, resolution=resolution)).build(None)
    large = StackedDigits(StackedDigits.Config(num_samples=64)).build(None)
    assert small.images.shape == (64, 3, resolution, resolution)
    assert torch.equal(small.labels, large.labels)
    from plugins.datasets.stacked_digits import downsample
    torch.testing.assert_close(downsample(small.images), downsample(large.images), rtol=0,
                               atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        downsample(torch.zeros(1, 3, 12, 12))
    from plugins.metrics.digit_classifier import DigitClassifier
    torch.testing.assert_close(DigitClassifier.channels(small.images),
                               DigitClassifier.channels(large.images), rtol=0, atol=1e-6)
    with pytest.raises(SpecregError, match="R in 8, 16, 32"):
        DigitClassifier.channels(torch.zeros(1, 3, 24, 24))
