"""The model the loop's speed figures are measured on (issue 15): resnet32 ch 32 / g_ch 32 at
32x32 with SN on D and the hinge loss, the quickstart's model when the issue measured it (the
quickstart now trains at 8x8, where a convolution costs a sixteenth and the figures would not be
comparable), and that quickstart's two metrics at 2000 samples.

    recipe = load_recipe(SPEED_RECIPE, [*SPEED_MODEL, "train.batch_size=64"])
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEED_RECIPE = REPO / "zoo" / "quickstart.toml"
#: overrides of the quickstart that give the benchmark model.
SPEED_MODEL = ["dataset.resolution=32", "architecture.resolution=32", "architecture.ch=32",
               "architecture.g_ch=32", "loss.name=hinge", "discriminator.regularizer.name=sn",
               "train.betas=[0.0, 0.9]", "eval.metrics.0.num_samples=2000",
               "eval.metrics.1.num_samples=2000", "eval.metrics.1.reference_samples=5000"]
