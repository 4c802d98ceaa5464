"""Dataset writers: files a dataset case's ``prepare`` can write, so the item checks run without
the real data."""

from __future__ import annotations

from pathlib import Path

from core.interfaces import Dataset


def write_prepared_sample(plugin: Dataset, root: Path, count: int = 8, split: str = "train",
                          seed: int = 0) -> None:
    """For datasets built on the built-in image datasets' base (``plugins.datasets.base.
    ImageDataset``: ``protocol(split)`` and ``prepared_files(root, split)``): write ``count``
    random images as the prepared array (:mod:`core.prepared`) ``build`` reads, with the
    plugin's own protocol, so the checks run without the real files: ``Case(plugin,
    prepare=lambda root: write_prepared_sample(plugin, root))``."""
    import numpy as np

    from core.prepared import write_prepared

    R = plugin.resolution
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, R, R, 3), dtype=np.uint8)
    labels = rng.integers(0, max(1, plugin.num_classes), count)
    source = [(images[i], int(labels[i])) for i in range(count)]
    protocol = dict(plugin.protocol(split))
    if plugin.num_classes:
        protocol["classes"] = [f"class{i}" for i in range(plugin.num_classes)]
    write_prepared(source, plugin.prepared_files(root, split), protocol, R, workers=0,
                   progress=False)
