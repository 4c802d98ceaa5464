"""The spectra record file: one appendable ``.npy`` per run (``RUN/spectra.npy``).

It is an ordinary NumPy file of a 1-D structured array, one element per record::

    spectra = np.load("runs/x/spectra.npy")
    spectra["iteration"]                  # int64 [n]
    spectra["layer_9"]                    # float32 [n, r]: singular values of the effective
                                          #   weight, descending (the paper's curves, unnormalized)
    spectra["layer_9.sigma_pi"]           # float32 [n]: power-iteration sigma estimate
    spectra["layer_9.s1_raw"]             # float32 [n]: exact s1 of the raw weight
    spectra.dtype.fields["layer_9"][2]    # "b4.c2 Conv2d 128x128x3x3" (module, type, shape)

Appending writes the new element after the last one, then rewrites the header's element count in
place (the header is padded so that the count can grow): the count is the commit point, so a crash
mid-append leaves a valid file, and a reader (``python -m core.plot`` during training) sees only
complete records. :func:`truncate` drops records past an iteration (resume from a checkpoint).
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from core.spectral.summary import LayerInfo

__all__ = ["FILENAME", "record_dtype", "layers_of", "make_record", "SpectraFile", "read_spectra",
           "truncate"]

FILENAME = "spectra.npy"
_MAGIC = b"\x93NUMPY"
#: the header reserves room for an element count of this many digits.
_COUNT_DIGITS = 15


def record_dtype(layers: Sequence[LayerInfo]) -> np.dtype:
    """The structured dtype of one record; each layer's singular values carry the layer's
    :attr:`LayerInfo.title` as their field title."""
    names, formats, titles = ["iteration"], ["<i8"], [None]
    for info in layers:
        names += [info.key, f"{info.key}.sigma_pi", f"{info.key}.s1_raw"]
        formats += [("<f4", (info.rank,)), "<f4", "<f4"]
        titles += [info.title, None, None]
    return np.dtype({"names": names, "formats": formats, "titles": titles})


def layers_of(dtype: np.dtype) -> list[LayerInfo]:
    """The layers a record dtype describes, in order."""
    out = []
    for name in dtype.names:
        if name.startswith("layer_") and "." not in name:
            title = dtype.fields[name][2]
            out.append(LayerInfo.from_title(int(name.split("_", 1)[1]), title))
    return out


def make_record(dtype: np.dtype, iteration: int, spectra: Sequence) -> np.ndarray:
    """One record from :class:`core.spectral.measure.LayerSpectrum` values, in layer order."""
    record = np.zeros((), dtype=dtype)
    record["iteration"] = iteration
    for info, spec in zip(layers_of(dtype), spectra):
        record[info.key] = spec.singular_values
        record[f"{info.key}.sigma_pi"] = spec.sigma_pi
        record[f"{info.key}.s1_raw"] = spec.s1_raw
    return record


def _header(dtype: np.dtype, count: int, total: int | None = None) -> bytes:
    """A version-1.0 (or 2.0 if large) ``.npy`` header of exactly ``total`` bytes (computed with
    room for ``_COUNT_DIGITS`` digits when None), padded with spaces and aligned to 64 bytes."""
    descr = np.lib.format.dtype_to_descr(dtype)

    def text(n: str) -> str:
        return "{'descr': %r, 'fortran_order': False, 'shape': (%s,), }" % (descr, n)

    if total is None:
        longest = len(text("9" * _COUNT_DIGITS).encode("latin1")) + 1
        version_bytes = 10 if longest + 10 < 65536 else 12
        total = -(-(longest + version_bytes) // 64) * 64
    body = text(str(count)).encode("latin1")
    version = (1, 0) if total - 10 < 65536 else (2, 0)
    prefix_len = 10 if version == (1, 0) else 12
    pad = total - prefix_len - len(body) - 1
    if pad < 0:
        raise ValueError("record count too large for the reserved header")
    size = (total - prefix_len).to_bytes(2 if version == (1, 0) else 4, "little")
    return _MAGIC + bytes(version) + size + body + b" " * pad + b"\n"


def _read_header(fh) -> tuple[np.dtype, int, int]:
    """(dtype, element count, offset of the data)."""
    fh.seek(0)
    if fh.read(6) != _MAGIC:
        raise ValueError(f"{getattr(fh, 'name', 'file')}: not a .npy file")
    major = fh.read(2)[0]
    length = int.from_bytes(fh.read(2 if major == 1 else 4), "little")
    header = ast.literal_eval(fh.read(length).decode("latin1"))
    dtype = np.lib.format.descr_to_dtype(header["descr"])
    return dtype, int(header["shape"][0]), fh.tell()


class SpectraFile:
    """Appends records to one run's spectra file (main process only)."""

    def __init__(self, path: Path, layers: Sequence[LayerInfo]) -> None:
        self.path = Path(path)
        self.dtype = record_dtype(layers)
        self.moved_aside: Path | None = None
        if self.path.is_file():
            with self.path.open("rb") as fh:
                existing = _read_header(fh)[0]
            if existing != self.dtype:  # another network wrote it: keep it, start afresh
                self.moved_aside = self.path.with_name(
                    f"{self.path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}{self.path.suffix}")
                os.replace(self.path, self.moved_aside)
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("wb") as fh:
                fh.write(_header(self.dtype, 0))

    def append(self, record: np.ndarray) -> None:
        with self.path.open("r+b") as fh:
            _, count, offset = _read_header(fh)
            fh.seek(offset + count * self.dtype.itemsize)
            fh.write(np.asarray(record, dtype=self.dtype).tobytes())
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            fh.write(_header(self.dtype, count + 1, offset))
            fh.flush()

    def truncate(self, keep_through: int) -> int:
        """Drop records past iteration ``keep_through``; returns how many were dropped."""
        return truncate(self.path, keep_through)


def read_spectra(path: Path) -> np.ndarray:
    """All complete records of a spectra file (also while it is being appended to)."""
    path = Path(path)
    for attempt in range(3):
        try:
            with path.open("rb") as fh:
                dtype, count, offset = _read_header(fh)
                fh.seek(offset)
                data = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype)
            if len(data) == count:
                return data.copy()
        except (SyntaxError, ValueError, IndexError):  # header caught mid-rewrite
            if attempt == 2:
                raise
        time.sleep(0.05)
    return data.copy()


def truncate(path: Path, keep_through: int) -> int:
    """Keep only the records with ``iteration <= keep_through`` (in place, crash-safe: the
    header's count shrinks first, then the file). Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = read_spectra(path)
    keep = data["iteration"] <= keep_through
    kept = int(keep.sum())
    if kept == len(data):
        return 0
    if not keep[:kept].all():  # not a prefix (never written so, but stay correct): rewrite
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tmp.open("wb") as fh:
            fh.write(_header(data.dtype, kept))
            fh.write(data[keep].tobytes())
        os.replace(tmp, path)
        return len(data) - kept
    with path.open("r+b") as fh:
        dtype, _, offset = _read_header(fh)
        fh.seek(0)
        fh.write(_header(dtype, kept, offset))
        fh.flush()
        fh.truncate(offset + kept * dtype.itemsize)
    return len(data) - kept
