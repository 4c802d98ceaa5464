"""Draw docs/quickstart_samples.png: stacked-digit samples of a quickstart run, each image beside
its three channels as grey digits with the digit classifier's reading (x: rejected), real images
of the data set in the top row for comparison. The RGB composite of three overlaid digits is hard
to read; the channels are what the ``modes`` metric reads.

    python docs/quickstart_figure.py runs/quickstart-YYYYMMDD-HHMMSS [--checkpoint best]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="best")
    parser.add_argument("--out", default=str(REPO / "docs" / "quickstart_samples.png"))
    parser.add_argument("--count", type=int, default=8, help="samples per row")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core import checkpoint as ckpt
    from core.recipe import load_recipe
    from core.train import build_models
    from plugins.datasets.stacked_digits import digit_pool, render
    from plugins.metrics.digit_classifier import load_digit_classifier

    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_dir / "recipe.toml")
    architecture, G, D, *_ = build_models(recipe)
    path = ckpt.resolve_checkpoint(run_dir, args.checkpoint)
    ckpt.load_models(path, {"generator": G, "discriminator": D})
    G.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        fake = G(*architecture.sample_latents(3 * args.count))
    pool, _ = digit_pool("test")
    index = torch.randint(0, len(pool), (args.count, 3), generator=torch.Generator().manual_seed(0))
    real = render(torch.from_numpy(pool)[index], fake.shape[-1])
    classifier = load_digit_classifier(recipe.data_root)
    rows = [("real", real)] + [(f"{path.name}", fake[i * args.count:(i + 1) * args.count])
                               for i in range(3)]
    fig, axes = plt.subplots(len(rows), 4 * args.count, dpi=110,
                             figsize=(args.count * 2.4, len(rows) * 0.75))
    for r, (name, images) in enumerate(rows):
        digits, accepted = classifier.classify_images(images)
        for i, image in enumerate(images):
            rgb = ((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
            axes[r, 4 * i].imshow(rgb, interpolation="nearest")
            for c in range(3):
                ax = axes[r, 4 * i + 1 + c]
                ax.imshow(rgb[:, :, c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ok = bool(accepted[i, c])
                ax.set_title(str(int(digits[i, c])) if ok else "x", fontsize=7, pad=1,
                             color="black" if ok else "red")
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{run_dir.name} ({path.name}): image, then its R, G, B digits with the "
                 f"classifier's reading (x: rejected); top row: real", fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
