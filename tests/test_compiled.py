"""``train.compile`` and ``train.channels_last`` (issue 15): the same training, up to float
rounding, with every piece that touches the networks (parametrizations, accumulation, checkpoints
and resume); a compiler that fails falls back to eager with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from core.errors import SpecregError
from core.recipe import load_recipe
from test_training import make_trainer, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = ["train.micro_batch_size=8", "train.iterations=3", "checkpoint.every=0"]  # accumulation 2


def losses(trainer, iterations: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(iterations):
        step = trainer.train_iteration()
        out.append((step["loss_d"], step["loss_g"]))
    return out


def assert_losses_close(got, want) -> None:
    # float rounding of another kernel order, carried through a few Adam steps
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-3, atol=1e-4)


def eager_losses(tmp_path, overrides, iterations=3):
    recipe = load_recipe(write_recipe(tmp_path), [*BASE, *overrides])
    return losses(make_trainer(recipe, tmp_path / "eager", callbacks=[]), iterations)


@pytest.mark.parametrize("regularizer", ["sn", "sr_static"])
def test_channels_last_trains_as_the_default_format(tmp_path, regularizer):
    overrides = [f"discriminator.regularizer.name={regularizer}",
                 "discriminator.regularizer.every=1"] if regularizer == "sr_static" else \
        [f"discriminator.regularizer.name={regularizer}"]
    want = eager_losses(tmp_path, overrides)
    recipe = load_recipe(write_recipe(tmp_path), [*BASE, *overrides, "train.channels_last=true"])
    trainer = make_trainer(recipe, tmp_path / "nhwc", callbacks=[])
    convs = [m for m in trainer.unwrapped(trainer.D).modules() if isinstance(m, torch.nn.Conv2d)]
    weight = convs[1].parametrizations.weight.original
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert_losses_close(losses(trainer, 3), want)
    eager = make_trainer(load_recipe(write_recipe(tmp_path), [*BASE, *overrides]),
                         tmp_path / "keys", callbacks=[])
    assert trainer.unwrapped(trainer.D).state_dict().keys() == \
        eager.unwrapped(eager.D).state_dict().keys()


@pytest.mark.slow  # tracing the networks' graphs takes a while on a CPU
def test_compiled_training_equals_eager_and_resumes_exactly(tmp_path):
    overrides = ["train.compile=true", "train.compile_backend=aot_eager",
                 "generator.regularizer.name=sn"]
    want = eager_losses(tmp_path, ["generator.regularizer.name=sn"], iterations=3)
    recipe = load_recipe(write_recipe(tmp_path), [*BASE, *overrides])
    straight = make_trainer(recipe, tmp_path / "straight", callbacks=[])
    got = losses(straight, 2)
    saved = straight.save_checkpoint()  # writing a checkpoint changes nothing of the run
    got += losses(straight, 1)
    assert_losses_close(got, want)
    # checkpoints hold the eager state dict (no ``_orig_mod.`` prefix); resuming continues exactly
    assert not any("_orig_mod" in k for k in straight.unwrapped(straight.G).state_dict())
    resumed = make_trainer(recipe, tmp_path / "resumed", callbacks=[])
    resumed.resume(saved)
    assert resumed.iteration == 2
    assert losses(resumed, 1) == got[2:]


def test_a_compiler_that_fails_trains_eagerly_with_a_warning(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()  # graphs cached by earlier tests would not reach the backend

    @torch._dynamo.register_backend(name="specreg_test_broken")
    def broken(graph, example_inputs):  # noqa: ARG001 - the backend protocol
        raise RuntimeError("this compiler is broken")

    want = eager_losses(tmp_path, [], iterations=1)
    recipe = load_recipe(write_recipe(tmp_path), [*BASE, "train.compile=true",
                                                  "train.compile_backend=specreg_test_broken"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(recipe, tmp_path / "broken", callbacks=[])
        got = losses(trainer, 1)
    assert_losses_close(got, want)
    assert any("this compiler is broken" in str(w.message) for w in caught), \
        [str(w.message)[:200] for w in caught]


def test_an_unknown_compile_backend_is_a_one_line_error_naming_the_key(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), [*BASE, "train.compile=true",
                                                  "train.compile_backend=inductr"])
    with pytest.raises(SpecregError) as info:
        make_trainer(recipe, tmp_path / "bad")
    message = str(info.value)
    assert "\n" not in message and message.startswith("train.compile_backend: ")
    assert "'inductr'" in message and "inductor" in message
