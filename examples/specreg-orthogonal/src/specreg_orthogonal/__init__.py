"""specreg-orthogonal: BigGAN's orthogonal regularization as a specreg regularizer plugin, and
the R2 gradient penalty (Mescheder et al. 2018, eq. 10), a penalty that sees the batch.

specreg finds it through the entry point ``orthogonal = "specreg_orthogonal"`` of group
``specreg`` (see pyproject.toml) and calls the hook below, which registers the regularizers under
the names ``orthogonal`` and ``r2``. A recipe that uses orthogonal ships with the package:
:func:`recipe_path`.

    pip install ./examples/specreg-orthogonal
    specreg plugins                                  # lists specreg-orthogonal 0.1.0
    specreg "$(python -c 'import specreg_orthogonal as o; print(o.recipe_path())')"
"""

from __future__ import annotations

from pathlib import Path

from core.hookspecs import hookimpl
from specreg_orthogonal.orthogonal import Orthogonal, OrthogonalConfigError, orthogonality
from specreg_orthogonal.r2 import R2, R2ConfigError

__all__ = ["Orthogonal", "OrthogonalConfigError", "orthogonality", "R2", "R2ConfigError",
           "recipe_path"]
__version__ = "0.1.0"


def recipe_path() -> Path:
    """The example recipe: SN on D, orthogonal regularization on G, stacked digits."""
    return Path(__file__).with_name("recipes") / "orthogonal_digits.toml"


@hookimpl
def register_regularizers(register) -> None:
    register("orthogonal", Orthogonal)
    register("r2", R2)
