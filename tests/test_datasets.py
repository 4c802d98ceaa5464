"""The real-data datasets on small files written here, read by torchvision's real code.

CIFAR-10 and STL-10 batches are written in torchvision's formats (pickled CIFAR batches, STL's
column-major binaries); torchvision checks every file's md5 against the published data set, so
the tests point those class attributes at the md5s of the files they wrote (computed here with
hashlib) and everything else -- the integrity check, the loading, the download and extraction --
is torchvision's own code. Expected pixels come from the arrays written, from the geometry of
the images drawn, or from PyTorch's own antialiased bicubic (an independent implementation).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import math
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from core import prepare as prepare_cli
from core.errors import DataMissingError, SpecregError
from core.registry import get_registry
from core.prepared import PreparedFiles, PreparedImages, PreparedMismatchError, write_prepared
from plugins.datasets.base import DecodedImages, ImageDataset

REPO = Path(__file__).resolve().parent.parent
LEVEL = 2.0 / 255.0  # one uint8 step in [-1, 1] units


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def as_float(pixels_hwc: np.ndarray) -> torch.Tensor:
    """Independent reference for the [-1, 1] scaling: float64 x / 127.5 - 1, channels first."""
    return torch.from_numpy(pixels_hwc.astype(np.float64) / 127.5 - 1.0).movedim(-1, -3)


def torch_resize(pixels_hwc: np.ndarray, size: int) -> torch.Tensor:
    """PyTorch's antialiased bicubic resize of uint8 HWC images, in [-1, 1] channels first."""
    x = torch.from_numpy(pixels_hwc).movedim(-1, -3).double()
    batched = x.dim() == 4
    y = F.interpolate(x if batched else x[None], size=(size, size), mode="bicubic",
                      antialias=True, align_corners=False).clamp(0, 255)
    y = y if batched else y[0]
    return y / 127.5 - 1.0


def dataset(name: str, **config):
    cls = get_registry().datasets[name]
    return cls(cls.Config(**config))


def items(data) -> tuple[torch.Tensor, list[int]]:
    pairs = [data[i] for i in range(len(data))]
    return torch.stack([x for x, _ in pairs]), [y for _, y in pairs]


# ---------------------------------------------------------------------------------------------
# torchvision's file formats, written small
# ---------------------------------------------------------------------------------------------


def smooth(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``uint8 [n, 3, h, w]``: coarse noise upsampled bilinearly (no edges for bicubic to ring on,
    so PIL's and PyTorch's resizers agree to about a level)."""
    coarse = torch.from_numpy(rng.uniform(0, 255, size=(n, 3, h // 8 + 2, w // 8 + 2)))
    fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return fine.round().clamp(0, 255).to(torch.uint8).numpy()


def write_cifar(folder: Path, per_batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10's python batches under ``folder/cifar-10-batches-py``; returns the HWC pixels."""
    rng = np.random.default_rng(seed)
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    out: dict[str, list] = {"train": [], "train_labels": [], "test": [], "test_labels": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        chw = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        entry = {"batch_label": name, "labels": labels, "data": chw.reshape(per_batch, 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        key = "test" if name == "test_batch" else "train"
        out[key].append(chw.transpose(0, 2, 3, 1))
        out[key + "_labels"] += labels
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return {k: np.concatenate(v) if k in ("train", "test") else np.asarray(v)
            for k, v in out.items()}


def trust_cifar(monkeypatch, base: Path) -> None:
    """Point torchvision's CIFAR10 md5 table at the files in ``base`` (cifar-10-batches-py)."""
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(base / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(base / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(base / "batches.meta")})


def write_stl10(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """STL-10's binaries under ``folder/stl10_binary`` (images column-major, as published)."""
    rng = np.random.default_rng(seed)
    base = folder / "stl10_binary"
    base.mkdir(parents=True)
    out = {}
    for stem, n in [("train", 2), ("unlabeled", 5), ("test", 3)]:
        chw = smooth(rng, n, 96, 96)  # [n, 3, 96 (H), 96 (W)]
        (base / f"{stem}_X.bin").write_bytes(chw.transpose(0, 1, 3, 2).tobytes())
        if stem != "unlabeled":
            (base / f"{stem}_y.bin").write_bytes(rng.integers(1, 11, size=n).astype(np.uint8)
                                                  .tobytes())
        out[stem] = chw.transpose(0, 2, 3, 1)
    return out


def trust_stl10(monkeypatch, base: Path) -> None:
    cls = torchvision.datasets.STL10
    monkeypatch.setattr(cls, "train_list", [[n, md5(base / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(base / n)] for n, _ in cls.test_list])


def write_image_folder(folder: Path, classes: dict[str, int], size=(30, 20), fmt="png",
                       seed: int = 0) -> dict[str, list[np.ndarray]]:
    """ImageFolder layout ``folder/<class>/<i>.<fmt>`` of random HxW images."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        out[name] = []
        for i in range(count):
            h, w = size if i % 2 == 0 else size[::-1]  # landscape and portrait
            pixels = np.ascontiguousarray(smooth(rng, 1, h, w)[0].transpose(1, 2, 0))
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.{fmt}", quality=95)
            out[name].append(pixels)
    return out


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, resolution, num_classes", [
    ("cifar10", 32, 0), ("stl10", 32, 0), ("imagenet", 128, 1000), ("celeba", 64, 0)])
def test_registered_with_paper_defaults(name, resolution, num_classes):
    data = dataset(name)
    assert isinstance(data, ImageDataset)
    assert data.resolution == resolution and data.num_classes == num_classes
    assert data.config.prepared is True


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def test_cifar10_reads_batches_through_torchvision(tmp_path, monkeypatch):
    written = write_cifar(tmp_path / "cifar10")
    trust_cifar(monkeypatch, tmp_path / "cifar10" / "cifar-10-batches-py")
    for split in ("train", "test"):
        data = dataset("cifar10", download=False).build(tmp_path, split)
        assert isinstance(data, DecodedImages)
        images, labels = items(data)
        assert images.dtype == torch.float32 and images.shape == (len(written[split]), 3, 32, 32)
        assert labels == written[split + "_labels"].tolist()
        torch.testing.assert_close(images.double(), as_float(written[split]), rtol=0, atol=1e-6)
        assert images.min() >= -1 and images.max() <= 1
    assert len(dataset("cifar10", download=False).build(tmp_path)) == 15
    assert dataset("cifar10", conditional=True).num_classes == 10


def test_cifar10_resized_like_torch_antialiased_bicubic(tmp_path, monkeypatch):
    written = write_cifar(tmp_path / "cifar10", per_batch=1)
    trust_cifar(monkeypatch, tmp_path / "cifar10" / "cifar-10-batches-py")
    images, _ = items(dataset("cifar10", download=False, resolution=16).build(tmp_path))
    expected = torch_resize(written["train"], 16)
    assert images.shape == (5, 3, 16, 16)
    assert (images.double() - expected).abs().max() <= 2 * LEVEL


def test_cifar10_wrong_checksums_are_reported(tmp_path):
    write_cifar(tmp_path / "cifar10")  # torchvision's real md5 table: every batch is "corrupted"
    with pytest.raises(DataMissingError) as err:
        dataset("cifar10", download=False).build(tmp_path)
    msg = str(err.value)
    assert "corrupted" in msg and str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "download = true" in msg


def test_cifar10_missing_names_files_url_and_folder(tmp_path):
    with pytest.raises(DataMissingError) as err:
        dataset("cifar10", download=False).build(tmp_path / "root")
    msg = str(err.value)
    folder = tmp_path / "root" / "cifar10"
    assert f"missing: the folder {folder / 'cifar-10-batches-py'}" in msg
    assert torchvision.datasets.CIFAR10.url in msg and f"-C {folder}" in msg
    assert "data_batch_5, test_batch, batches.meta" in msg and "download = true" in msg
    assert not folder.exists()


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A local HTTP server over ``tmp_path / 'www'``: yields its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()


def test_cifar10_downloads_with_torchvision_into_place(tmp_path, monkeypatch, http_folder):
    url, www = http_folder
    written = write_cifar(tmp_path / "src")
    base = tmp_path / "src" / "cifar-10-batches-py"
    with tarfile.open(www / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(base, arcname="cifar-10-batches-py")
    trust_cifar(monkeypatch, base)
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cls, "tgz_md5", md5(www / "cifar-10-python.tar.gz"))

    images, labels = items(dataset("cifar10").build(tmp_path / "root"))
    torch.testing.assert_close(images.double(), as_float(written["train"]), rtol=0, atol=1e-6)
    assert labels == written["train_labels"].tolist()
    folder = tmp_path / "root" / "cifar10"
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-py"]  # no archive, no tmp


def test_cifar10_failed_download_leaves_nothing(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url",
                        f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(DataMissingError) as err:
        dataset("cifar10", download=True).build(tmp_path)
    assert "Downloading it failed" in str(err.value) and "retries" in str(err.value)
    assert not (tmp_path / "cifar10").exists()


# ---------------------------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------------------------


def test_stl10_unlabeled_split_resized(tmp_path, monkeypatch):
    written = write_stl10(tmp_path / "stl10")
    trust_stl10(monkeypatch, tmp_path / "stl10" / "stl10_binary")
    native, labels = items(dataset("stl10", download=False, resolution=96).build(tmp_path))
    assert labels == [0] * 5  # unconditional
    torch.testing.assert_close(native.double(), as_float(written["unlabeled"]), rtol=0, atol=1e-6)
    for r in (48, 32):
        small, _ = items(dataset("stl10", download=False, resolution=r).build(tmp_path))
        assert small.shape == (5, 3, r, r)
        assert (small.double() - torch_resize(written["unlabeled"], r)).abs().max() <= 2 * LEVEL
    test, _ = items(dataset("stl10", download=False, resolution=96).build(tmp_path, "test"))
    torch.testing.assert_close(test.double(), as_float(written["test"]), rtol=0, atol=1e-6)
    with pytest.raises(SpecregError, match="source_split"):
        dataset("stl10", download=False, source_split="labeled").build(tmp_path)


def test_stl10_missing(tmp_path):
    with pytest.raises(DataMissingError) as err:
        dataset("stl10", download=False).build(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "stl10" / "stl10_binary") in msg and "unlabeled_X.bin" in msg
    assert torchvision.datasets.STL10.url in msg


# ---------------------------------------------------------------------------------------------
# ImageNet and CelebA image folders
# ---------------------------------------------------------------------------------------------


def test_imagenet_center_crops_the_shorter_side(tmp_path):
    """A 40x60 image whose central 40x40 square is one colour and whose sides are another:
    resize-shorter-side + center-crop keeps only the square (squashing would keep the sides)."""
    for name, (h, w) in {"n0": (40, 60), "n1": (60, 40)}.items():
        pixels = np.full((h, w, 3), (200, 30, 90), dtype=np.uint8)
        top, left = (h - 40) // 2, (w - 40) // 2
        pixels[top:top + 40, left:left + 40] = (10, 120, 250)
        (tmp_path / "imagenet" / "train" / name).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "imagenet" / "train" / name / "a.png")
    images, labels = items(dataset("imagenet", resolution=20, num_classes=2).build(tmp_path))
    assert labels == [0, 1] and images.shape == (2, 3, 20, 20)
    centre = as_float(np.array([[[10, 120, 250]]], dtype=np.uint8))  # [3, 1, 1]
    # bicubic lets the sides ring into the outer 2 pixels only; the inside is exactly the square
    torch.testing.assert_close(images[:, :, 2:-2, 2:-2].double(),
                               centre.expand(2, 3, 16, 16), rtol=0, atol=1e-6)


def test_imagenet_decoded_like_torch_resize_of_the_crop(tmp_path):
    written = write_image_folder(tmp_path / "imagenet" / "train", {"n01": 2, "n02": 3},
                                 size=(40, 60))
    data = dataset("imagenet", resolution=20, num_classes=2).build(tmp_path)
    images, labels = items(data)
    assert labels == [0, 0, 1, 1, 1]
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    expected = []
    for pixels in written["n01"] + written["n02"]:
        h, w = pixels.shape[:2]
        s = min(h, w)
        crop = pixels[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        expected.append(torch_resize(np.ascontiguousarray(crop), 20))
    # inside the 2-pixel border (where PIL's filter reads past the crop) PIL == PyTorch
    diff = (images.double() - torch.stack(expected))[:, :, 2:-2, 2:-2].abs()
    assert diff.max() <= 2 * LEVEL


def test_imagenet_class_count_and_missing(tmp_path):
    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 1, "n02": 1})
    with pytest.raises(SpecregError, match="found 2 class folders.*num_classes = 1000"):
        dataset("imagenet").build(tmp_path)
    assert len(dataset("imagenet", num_classes=0, resolution=8).build(tmp_path)) == 2
    with pytest.raises(DataMissingError) as err:
        dataset("imagenet").build(tmp_path, "val")
    msg = str(err.value)
    assert str(tmp_path / "imagenet" / "val") in msg and "python -m core.prepare imagenet" in msg
    (tmp_path / "empty" / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(DataMissingError, match="not in ImageFolder layout"):
        dataset("imagenet").build(tmp_path / "empty")
    with pytest.raises(SpecregError, match="valid: train, val"):
        dataset("imagenet").build(tmp_path, "test")


def test_celeba_center_crop_then_resize(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    for i, colour in enumerate(colours):  # 36x44 "faces" whose center 24x24 is one colour
        pixels = np.full((44, 36, 3), 128, dtype=np.uint8)
        pixels[10:34, 6:30] = colour
        Image.fromarray(pixels).save(folder / f"{i + 1:06d}.png")
    data = dataset("celeba", resolution=12, crop=24).build(tmp_path)
    images, labels = items(data)
    assert labels == [0, 0, 0] and images.shape == (3, 3, 12, 12)
    for image, colour in zip(images, colours):
        inside = as_float(np.array([[colour]], dtype=np.uint8)).expand(3, 8, 8)
        torch.testing.assert_close(image[:, 2:-2, 2:-2].double(), inside, rtol=0, atol=1e-6)
    with pytest.raises(SpecregError, match="does not fit"):
        dataset("celeba", resolution=12, crop=40).build(tmp_path)[0]


def test_celeba_missing(tmp_path):
    with pytest.raises(DataMissingError) as err:
        dataset("celeba").build(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "celeba" / "img_align_celeba") in msg and "000001.jpg" in msg
    assert "python -m core.prepare celeba --resolution 64" in msg


# ---------------------------------------------------------------------------------------------
# The prepared format
# ---------------------------------------------------------------------------------------------


def test_prepared_array_gives_the_decoded_tensors(tmp_path, capsys):
    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 3, "n02": 4}, fmt="jpg")
    args = ["imagenet", "--resolution", "16", "--root", str(tmp_path), "--workers", "0",
            "--set", "num_classes=2", "--quiet"]
    assert prepare_cli.main(args) == 0
    assert "7 images, 16x16" in capsys.readouterr().out
    files = PreparedFiles.at(tmp_path / "imagenet", "train", 16)
    meta = json.loads(files.meta.read_text())
    assert meta["count"] == 7 and meta["resolution"] == 16 and meta["classes"] == ["n01", "n02"]
    assert meta["dataset"] == "imagenet" and "bicubic" in meta["resize"]
    array = np.load(files.images, mmap_mode="r")
    assert array.dtype == np.uint8 and array.shape == (7, 16, 16, 3)
    assert sorted(p.name for p in files.images.parent.iterdir()) == [
        "prepared_train_16.json", "prepared_train_16.npy", "prepared_train_16_labels.npy",
        "train"]  # nothing partial left

    plugin = dataset("imagenet", resolution=16, num_classes=2)
    prepared = plugin.build(tmp_path)
    decoded = dataset("imagenet", resolution=16, num_classes=2, prepared=False).build(tmp_path)
    assert isinstance(prepared, PreparedImages) and isinstance(decoded, DecodedImages)
    (a, la), (b, lb) = items(prepared), items(decoded)
    assert la == lb == [0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(a, b)  # the same uint8 pixels through the same scaling: bit-identical
    # batched reads (DataLoader -> __getitems__) in a shuffled order give the same items
    order = [5, 0, 6, 2]
    batch = next(iter(torch.utils.data.DataLoader(prepared, batch_size=4,
                                                  sampler=order)))
    assert torch.equal(batch[0], a[order]) and batch[1].tolist() == [la[i] for i in order]

    # the prepared array is enough: training works with the JPEGs gone
    for jpg in (tmp_path / "imagenet" / "train").rglob("*.jpg"):
        jpg.unlink()
    assert torch.equal(items(plugin.build(tmp_path))[0], a)
    # ... and an up-to-date array is not written again
    assert prepare_cli.main(args) == 0
    assert "already prepared" in capsys.readouterr().err


def test_prepared_array_must_match_the_config(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((44, 36, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    prepare_cli.prepare("celeba", 12, tmp_path, settings=["crop=24"], workers=0, progress=False)
    assert isinstance(dataset("celeba", resolution=12, crop=24).build(tmp_path), PreparedImages)
    with pytest.raises(PreparedMismatchError, match="crop: prepared with 24, the recipe asks for 20"):
        dataset("celeba", resolution=12, crop=20).build(tmp_path)
    assert isinstance(dataset("celeba", resolution=12, crop=20, prepared=False).build(tmp_path),
                      DecodedImages)
    # another resolution has its own file: no prepared array at 16 -> decoded
    assert isinstance(dataset("celeba", resolution=16, crop=24).build(tmp_path), DecodedImages)


class _Source(torch.utils.data.Dataset):
    """Ten 4x4 images of value ``i``; the one at ``fail_at`` fails to decode."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise OSError("truncated file")
        return np.full((4, 4, 3), i, np.uint8), i % 3


def test_interrupted_prepare_leaves_no_files(tmp_path):
    files = PreparedFiles.at(tmp_path, "train", 4)
    with pytest.raises(OSError, match="truncated"):
        write_prepared(_Source(fail_at=4), files, {"dataset": "x"}, 4, progress=False)
    assert list(tmp_path.iterdir()) == []
    # a set that is there stays usable when preparing it again fails
    write_prepared(_Source(), files, {"dataset": "x"}, 4, progress=False)
    with pytest.raises(OSError, match="truncated"):
        write_prepared(_Source(fail_at=7), files, {"dataset": "x"}, 4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "prepared_train_4.json", "prepared_train_4.npy", "prepared_train_4_labels.npy"]
    data = PreparedImages(files)
    assert [data[i][1] for i in range(10)] == [i % 3 for i in range(10)]
    torch.testing.assert_close(data[9][0], torch.full((3, 4, 4), 9 / 127.5 - 1))


def test_prepare_rejects_bad_input(tmp_path, capsys):
    assert prepare_cli.main(["cifar", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'cifar' (did you mean 'cifar10'?)" in err
    assert "celeba, cifar10, imagenet, stl10" in err
    assert prepare_cli.main(["stacked_digits"]) == 2
    assert "needs no preparation" in capsys.readouterr().err
    assert prepare_cli.main(["celeba", "--set", "crp=3", "--root", str(tmp_path)]) == 2
    assert "did you mean 'crop'" in capsys.readouterr().err
    assert prepare_cli.main(["celeba", "--split", "test", "--root", str(tmp_path)]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert prepare_cli.main(["celeba", "--root", str(tmp_path)]) == 2
    assert str(tmp_path / "celeba" / "img_align_celeba") in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_command_end_to_end(tmp_path):
    """``python -m core.prepare`` in a subprocess, with two decoding worker processes."""
    write_image_folder(tmp_path / "imagenet" / "train", {"n01": 40, "n02": 30}, fmt="jpg")
    run = subprocess.run(
        [sys.executable, "-m", "core.prepare", "imagenet", "--resolution", "8", "--root",
         str(tmp_path), "--workers", "2", "--set", "num_classes=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "70 images, 8x8" in run.stdout and "70/70" in run.stderr  # the progress bar
    prepared = dataset("imagenet", resolution=8, num_classes=2).build(tmp_path)
    decoded = dataset("imagenet", resolution=8, num_classes=2, prepared=False).build(tmp_path)
    assert isinstance(prepared, PreparedImages)
    assert torch.equal(items(prepared)[0], items(decoded)[0])
    assert items(prepared)[1] == [0] * 40 + [1] * 30

    bad = subprocess.run([sys.executable, "-m", "core.prepare", "imagenett"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'imagenet'" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Resize filters and dequantization (issue 11.6)
# ---------------------------------------------------------------------------------------------


def generated_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """``uint8 [h, w, 3]``: smooth noise plus a sharp bar (so that the filters differ)."""
    pixels = np.ascontiguousarray(smooth(np.random.default_rng(seed), 1, h, w)[0].transpose(1, 2, 0))
    pixels[h // 3:h // 3 + 3, :] = (250, 10, 120)
    return pixels


def torch_filter(pixels_hwc: np.ndarray, size: int, mode: str, antialias: bool) -> np.ndarray:
    """PyTorch's resize of a uint8 HWC image to ``size x size``, rounded half up, uint8 HWC."""
    x = torch.from_numpy(pixels_hwc).movedim(-1, 0).double()[None]
    y = F.interpolate(x, size=(size, size), mode=mode, antialias=antialias, align_corners=False)
    return torch.floor(y[0].clamp(0, 255) + 0.5).movedim(0, -1).to(torch.uint8).numpy()


def levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("h, w, size", [(40, 60, 16), (96, 96, 48), (37, 37, 24)])
def test_pil_filters_are_pils_resize_of_the_center_square_and_close_to_torch(h, w, size):
    from plugins.datasets.pixels import center_box, square_crop_resize

    pixels = generated_image(h, w)
    image = Image.fromarray(pixels)
    box = center_box(w, h, min(h, w))
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.ascontiguousarray(pixels[top:top + s, left:left + s])
    for name, pil, mode in (("bicubic", Image.Resampling.BICUBIC, "bicubic"),
                            ("bilinear", Image.Resampling.BILINEAR, "bilinear")):
        ours = square_crop_resize(image, size, resize_filter=name)
        assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
        # PIL's own resize (what scipy.misc.imresize(x, size, "bilinear") calls) of the square
        assert np.array_equal(ours, np.array(image.resize((size, size), pil, box=box)))
        if (h - s) % 2 == 0 and (w - s) % 2 == 0:  # whole-pixel square: torch resizes the crop
            reference = torch_filter(crop, size, mode, antialias=True)
            inside = (slice(2, -2), slice(2, -2))  # PIL reads past the crop at its border
            assert levels_apart(ours[inside], reference[inside]) <= 2
    assert not np.array_equal(square_crop_resize(image, size, resize_filter="bicubic"),
                              square_crop_resize(image, size, resize_filter="bilinear"))


@pytest.mark.parametrize("h, w, size", [(40, 61, 16), (96, 96, 48), (128, 128, 64), (20, 20, 32)])
def test_cv2_linear_samples_bilinearly_without_antialiasing_like_torch(h, w, size):
    """cv2.resize's INTER_LINEAR = bilinear sampling at half-pixel centres, edges repeated: what
    torch's interpolate(bilinear, align_corners=False, antialias=False) computes (to one level:
    rounding), of the square cropped at whole pixels as the BSSN code's NumPy slices."""
    from plugins.datasets.pixels import square_crop_resize

    pixels = generated_image(h, w, seed=3)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2  # 40x61: left = 10, not 10.5
    crop = np.ascontiguousarray(pixels[top:top + s, left:left + s])
    ours = square_crop_resize(Image.fromarray(pixels), size, resize_filter="cv2-linear")
    assert levels_apart(ours, torch_filter(crop, size, "bilinear", antialias=False)) <= 1
    if s == 2 * size:  # exactly halving: each pixel is the mean of a 2x2 block, rounded half up
        blocks = crop.astype(np.float64).reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
        assert np.array_equal(ours, np.floor(blocks + 0.5).astype(np.uint8))
        antialiased = torch_filter(crop, size, "bilinear", antialias=True)
        assert levels_apart(ours, antialiased) > 2  # PIL/torch antialiasing differs from it


def test_resize_filter_reaches_the_decoded_and_prepared_images(tmp_path, monkeypatch):
    from core.prepared import to_float
    from plugins.datasets.pixels import RESIZE_FILTERS, linear_resize

    written = write_cifar(tmp_path / "cifar10", per_batch=1)
    trust_cifar(monkeypatch, tmp_path / "cifar10" / "cifar-10-batches-py")
    images, _ = items(dataset("cifar10", download=False, resolution=16,
                              resize_filter="cv2-linear").build(tmp_path))
    expected = torch.stack([to_float(torch.from_numpy(linear_resize(p, 16)))
                            for p in written["train"]])
    assert torch.equal(images, expected)
    blocks = written["train"].astype(np.float64).reshape(5, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    torch.testing.assert_close(images.double(), as_float(np.floor(blocks + 0.5)), rtol=0,
                               atol=1e-6)  # halving: 2x2 means
    bilinear, _ = items(dataset("cifar10", download=False, resolution=16,
                                resize_filter="bilinear").build(tmp_path))
    assert (bilinear.double() - as_float(np.stack([torch_filter(p, 16, "bilinear", True)
                                                   for p in written["train"]]))
            ).abs().max() <= 2 * LEVEL
    # the prepared array records its filter, and a recipe asking for another one is refused
    assert prepare_cli.main(["cifar10", "--resolution", "16", "--root", str(tmp_path),
                             "--workers", "0", "--quiet", "--set", "download=false",
                             "--set", "resize_filter=cv2-linear"]) == 0
    meta = json.loads(PreparedFiles.at(tmp_path / "cifar10", "train", 16).meta.read_text())
    assert meta["resize"] == RESIZE_FILTERS["cv2-linear"]
    prepared = dataset("cifar10", download=False, resolution=16, resize_filter="cv2-linear")
    assert isinstance(prepared.build(tmp_path), PreparedImages)
    assert torch.equal(items(prepared.build(tmp_path))[0], images)
    with pytest.raises(PreparedMismatchError, match="resize: prepared with 'bilinear sampling"):
        dataset("cifar10", download=False, resolution=16, resize_filter="bilinear").build(tmp_path)


def test_unknown_resize_filter_is_one_clear_error(tmp_path):
    with pytest.raises(SpecregError) as err:
        dataset("celeba", resize_filter="lanczos").build(tmp_path)
    assert str(err.value) == ("celeba: resize_filter must be one of 'bicubic', "
                              "'bilinear', 'cv2-linear', got 'lanczos'")


def test_the_default_protocol_is_the_one_prepared_arrays_always_had():
    """Arrays prepared before resize_filter existed stay valid: same ``resize`` text."""
    assert dataset("imagenet").protocol("train")["resize"] == \
        "PIL bicubic (antialiased) of the centered square crop"


def test_dequantized_is_x_over_128_minus_1_plus_the_noise():
    from core.data import DEQUANTIZATION_STEP, dequantization_noise, dequantized
    from core.prepared import to_float

    p = torch.arange(256, dtype=torch.uint8).repeat(48).view(16, 16, 16, 3)  # every level
    items_ = to_float(p).contiguous()  # what the datasets give: p / 127.5 - 1
    noise = dequantization_noise(seed=5, position=7, places=range(16), shape=(3, 16, 16))
    out = dequantized(items_, noise)
    pixels = p.movedim(-1, -3).double()
    direct = pixels / 128.0 - 1.0 + noise.double()  # the Chainer loaders' formula
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), direct, rtol=0, atol=1e-7)
    grid = pixels / 128.0 - 1.0
    offset = out.double() - grid
    assert DEQUANTIZATION_STEP == 1 / 128
    assert offset.min() >= 0 and offset.max() < 1 / 128  # each value stays in its own cell
    assert out.min() >= -1 and out.max() < 1 and out.max() > 1 - 2 / 128
    sigma = (1 / 128) / math.sqrt(12) / math.sqrt(offset.numel())
    assert abs(offset.mean().item() - 1 / 256) < 5 * sigma  # mean offset 1/256
    assert torch.unique(out).numel() > 0.95 * out.numel()  # continuous, not 256 levels
    assert torch.unique(items_).numel() == 256


def test_dequantization_noise_is_fixed_by_seed_position_and_place_only():
    from core.data import BatchPlan, GlobalBatchSampler, dequantization_noise, micro_batch_places

    shape = (3, 4, 4)
    whole = dequantization_noise(0, 3, range(8), shape)
    assert torch.equal(whole, dequantization_noise(0, 3, range(8), shape))  # reproducible
    assert torch.equal(torch.cat([dequantization_noise(0, 3, range(0, 5), shape),
                                  dequantization_noise(0, 3, range(5, 8), shape)]), whole)
    assert not torch.equal(dequantization_noise(0, 4, range(8), shape), whole)  # next batch
    assert not torch.equal(dequantization_noise(1, 3, range(8), shape), whole)  # other seed
    assert len({tuple(n.flatten().tolist()) for n in whole}) == 8  # every place its own
    assert whole.min() >= 0 and whole.max() < 1 / 128
    # the places are the ones the sampler hands each process and micro-batch
    for processes, cap in [(1, 0), (2, 2), (4, 1), (2, 0)]:
        plan = BatchPlan.derive(8, processes, cap)
        seen = {}
        for rank in range(processes):
            sampler = iter(GlobalBatchSampler(24, plan, rank, seed=9))
            permutation = torch.randperm(24, generator=torch.Generator().manual_seed(9 * 1_000_003))
            for m in range(plan.accumulation):
                places = micro_batch_places(plan, rank, m)
                assert next(sampler) == permutation[places.start:places.stop].tolist()
                seen.update({j: rank for j in places})
        assert sorted(seen) == list(range(8))


def _dequantized_trainer(tmp_path, name: str, dequantize: bool = True, micro: int = 0):
    from core.recipe import structure_recipe
    from core.testing import write_prepared_sample
    from core.train import build_trainer, make_accelerator

    cifar = get_registry().datasets["cifar10"]
    root = tmp_path / "data"
    if not (root / "cifar10").is_dir():
        write_prepared_sample(cifar(cifar.Config(download=False)), root, count=16, seed=4)
    recipe = structure_recipe({
        "seed": 11, "data_root": str(root),
        "dataset": {"name": "cifar10", "download": False, "dequantize": dequantize},
        "architecture": {"name": "resnet32", "ch": 8, "g_ch": 8},
        "train": {"iterations": 1, "batch_size": 8, "micro_batch_size": micro, "cpu": True},
        "log": {"every": 1, "sample_every": 0, "progress": False}})
    return build_trainer(recipe, tmp_path / name, make_accelerator(recipe)), root


def test_the_loop_feeds_d_dequantized_reals_reproducibly(tmp_path):
    """dequantize = true: each real is ``p/128 - 1 + U(0, 1/128)`` with the noise of its place in
    its global batch; one batch or micro-batches, straight or resumed, give the same reals, and
    an image seen again in the next epoch gets new noise. false: the items themselves."""
    from core.data import BatchPlan, GlobalBatchSampler, dequantization_noise

    straight, root = _dequantized_trainer(tmp_path, "straight")
    batches = [straight.next_micro_batch() for _ in range(4)]  # 2 epochs of 16 images
    pixels = np.load(root / "cifar10" / "prepared_train_32.npy")
    order = iter(GlobalBatchSampler(16, BatchPlan.derive(8, 1), 0, seed=11))
    seen: dict[int, list[torch.Tensor]] = {}
    for position, (images, labels) in enumerate(batches):
        index = next(order)
        p = torch.from_numpy(pixels[index]).movedim(-1, -3).double()
        noise = dequantization_noise(11, position, range(8), (3, 32, 32))
        torch.testing.assert_close(images.double(), p / 128 - 1 + noise.double(), rtol=0,
                                   atol=1e-7)
        for i, j in enumerate(index):
            seen.setdefault(j, []).append(images[i] - (p[i] / 128 - 1).float())
    assert all(len(v) == 2 and not torch.equal(v[0], v[1]) for v in seen.values())

    split, _ = _dequantized_trainer(tmp_path, "micro", micro=4)
    assert split.plan.accumulation == 2
    for images, _ in batches[:2]:
        assert torch.equal(torch.cat([split.next_micro_batch()[0], split.next_micro_batch()[0]]),
                           images)
    resumed, _ = _dequantized_trainer(tmp_path, "resumed")
    resumed.data_position = 3  # what resume() restores from a checkpoint
    assert torch.equal(resumed.next_micro_batch()[0], batches[3][0])

    plain, _ = _dequantized_trainer(tmp_path, "plain", dequantize=False)
    images, _ = plain.next_micro_batch()
    index = next(iter(GlobalBatchSampler(16, BatchPlan.derive(8, 1), 0, seed=11)))
    torch.testing.assert_close(images.double(), as_float(pixels[index]), rtol=0, atol=1e-6)
    for trainer in (straight, split, resumed, plain):
        trainer.log.close()


def test_dequantize_defaults_off_and_stacked_digits_has_none():
    for name in ("cifar10", "stl10", "imagenet", "celeba"):
        assert dataset(name).dequantize is False and dataset(name, dequantize=True).dequantize
        assert dataset(name).resize_filter == "bicubic"
    assert dataset("stacked_digits").dequantize is False  # not 8-bit images: no such option


# ---------------------------------------------------------------------------------------------
# core.prepare reaches datasets through the registry
# ---------------------------------------------------------------------------------------------


def test_prepare_offers_any_registered_dataset_that_supports_it(tmp_path, capsys):
    """A plugin's dataset (not an ImageDataset) with ``supports_prepare`` is listed and prepared
    by ``python -m core.prepare``, which calls its ``prepare`` with the command's arguments."""
    import attrs

    from core import testing
    from core.interfaces import Dataset

    calls = []

    class Tiles(Dataset):
        """Four 2x2 tiles."""

        supports_prepare = True

        @attrs.define
        class Config:
            resolution: int = 2
            shade: int = 0

        @property
        def resolution(self):
            return self.config.resolution

        def build(self, root, split="train"):
            return [(torch.zeros(3, 2, 2), 0)] * 4

        def prepare(self, root, split="train", workers=0, force=False, progress=True):
            calls.append((self.name, self.config, Path(root), split, workers, force, progress))
            return {"count": 4, "resolution": self.resolution, "source": str(root),
                    "images": "tiles.npy"}

    with testing.registered(Tiles) as name:
        assert prepare_cli.main(["nope", "--root", str(tmp_path)]) == 2
        assert name in capsys.readouterr().err.split("can be prepared: ")[1]
        args = [name, "--root", str(tmp_path), "--workers", "3", "--set", "shade=7", "--force",
                "--quiet", "--resolution", "4"]
        assert prepare_cli.main(args) == 0
    assert calls == [(name, Tiles.Config(resolution=4, shade=7), tmp_path, "train", 3, True, False)]
    assert f"{name} train: 4 images, 4x4" in capsys.readouterr().out
