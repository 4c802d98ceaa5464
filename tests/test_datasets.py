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
from plugins.datasets.base import DecodedImages, ImageDataset
from plugins.datasets.prepared import (PreparedFiles, PreparedImages, PreparedMismatchError,
                                       write_prepared)

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
