"""Run by the DDP tests under ``torchrun``: train a recipe, then save this rank's full state.

    torchrun --nproc_per_node 2 tests/ddp_worker.py RECIPE OUT_DIR [KEY=VALUE ...]

``architecture.name=test_no_batch_stats`` selects the BatchNorm-free test architecture of
tests/test_training.py (registered here, as in that module's fixture). ``SPECREG_TEST_SGD=1``:
plain SGD in place of Adam (:func:`test_training.sgd_optimizer`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from core.recipe import load_recipe
from core.run import shutdown
from core.train import build_trainer, make_accelerator


def main() -> None:
    recipe_path, out = sys.argv[1], Path(sys.argv[2])
    if "architecture.name=test_no_batch_stats" in sys.argv[3:]:
        from core.registry import Provider, get_registry
        from test_training import _TestPlugin

        get_registry().add(_TestPlugin, Provider(name="tests.test_training"))
    if os.environ.get("SPECREG_TEST_SGD") == "1":
        from core.train import Trainer
        from test_training import sgd_optimizer

        Trainer.build_optimizer = sgd_optimizer
    recipe = load_recipe(recipe_path, sys.argv[3:])
    accelerator = make_accelerator(recipe)
    trainer = build_trainer(recipe, out / "run", accelerator)
    trainer.fit()
    state = {}
    for key, model in trainer.models.items():
        for name, value in trainer.unwrapped(model).state_dict().items():
            state[f"{key}.{name}"] = value.detach().cpu().clone().contiguous()
    save_file(state, str(out / f"rank{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    shutdown(0)


if __name__ == "__main__":
    main()
