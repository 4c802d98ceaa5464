"""Recipes: extends, overrides, the resolved recipe, and the error messages."""

from __future__ import annotations

import tomllib

import pytest
import tomli_w

from conftest import run_cli
from core.recipe import Recipe, RecipeError, load_recipe, recipe_to_table, structure_recipe

BASE = """
seed = 3
[dataset]
name = "stacked_digits"
num_samples = 1000
[architecture]
name = "resnet32"
ch = 16
g_ch = 16
[discriminator.regularizer]
name = "sr_static"
fraction = 0.25
[train]
iterations = 100
batch_size = 8
"""


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text(BASE)
    return path


def test_extends_merges_tables_key_by_key(tmp_path, base):
    child = tmp_path / "sub" / "child.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base.toml"\n[train]\nbatch_size = 16\n')
    recipe = load_recipe(child)
    assert recipe.train.batch_size == 16 and recipe.train.iterations == 100  # both sides kept
    assert recipe.seed == 3 and recipe.architecture.config.ch == 16
    assert recipe.discriminator.regularizer.config.fraction == 0.25


def test_changing_a_plugin_name_replaces_its_table(tmp_path, base):
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[discriminator.regularizer]\nname = "sn"\n')
    recipe = load_recipe(child)  # 'fraction' belongs to sr_static and must not leak into sn
    assert recipe.discriminator.regularizer.name == "sn"


def test_overrides_are_typed_like_the_recipe(base):
    recipe = load_recipe(base, ["train.lr_d=1e-4", "train.iterations=7", "train.betas=[0.5, 0.99]",
                                "train.mixed_precision=bf16", "discriminator.regularizer.every=2"])
    assert recipe.train.lr_d == pytest.approx(1e-4) and recipe.train.iterations == 7
    assert tuple(recipe.train.betas) == (0.5, 0.99)
    assert recipe.train.mixed_precision == "bf16"
    assert recipe.discriminator.regularizer.config.every == 2
    with pytest.raises(RecipeError, match=r"--set train.iterations=many: wrong type at "
                                          r"train.iterations: expected an integer"):
        load_recipe(base, ["train.iterations=many"])


def test_override_switching_regularizer_drops_the_old_keys(base):
    recipe = load_recipe(base, ["discriminator.regularizer.name=sr_dynamic"])
    assert recipe.discriminator.regularizer.name == "sr_dynamic"


def test_three_mistakes_give_three_lines_with_file_and_key_path(tmp_path, base):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "base.toml"\n[train]\nbatchsize = 4\niterations = "ten"\n'
                   '[loss]\nname = "hinje"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    lines = info.value.problems
    assert len(lines) == 3, lines
    assert f"{bad}: unknown key 'batchsize' (did you mean 'batch_size'?) at train" in lines
    assert f"{bad}: wrong type at train.iterations: expected an integer, got string 'ten'" in lines
    assert any(line.startswith(f"{bad}: unknown loss 'hinje' (did you mean 'hinge'?)")
               and line.endswith("at loss") for line in lines)


def test_errors_in_a_base_recipe_name_the_base_file(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text(BASE.replace("fraction = 0.25", "fracton = 0.25"))
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(child)
    assert info.value.problems == [
        f"{base}: unknown key 'fracton' (did you mean 'fraction'?) at discriminator.regularizer"]


def test_literal_and_missing_plugin_messages(tmp_path, base):
    with pytest.raises(RecipeError) as info:
        load_recipe(base, ["train.mixed_precision=fp8", "discriminator.regularizer.mode=svd"])
    assert "--set train.mixed_precision=fp8: invalid value at train.mixed_precision: must be one " \
           "of 'no', 'fp16', 'bf16'" in info.value.problems
    assert any("discriminator.regularizer.mode" in p and "'projection'" in p
               for p in info.value.problems)


def test_resolved_recipe_round_trips(base):
    recipe = load_recipe(base, ["train.iterations=5"])
    table = tomllib.loads(tomli_w.dumps(recipe_to_table(recipe)))
    assert structure_recipe(table) == recipe
    assert isinstance(recipe, Recipe)


def test_cli_reports_every_problem_and_exits_2_without_traceback(tmp_path, base):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "base.toml"\n[train]\nbatchsize = 4\niterations = "ten"\n'
                   '[loss]\nname = "hinje"\n')
    result = run_cli([str(bad), "--dry-run"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problem_lines = [line for line in result.stderr.splitlines() if str(bad) in line]
    assert len(problem_lines) == 3, result.stderr
