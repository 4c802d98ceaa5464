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


# ---------------------------------------------------------------------------------------------
# Callback tables
# ---------------------------------------------------------------------------------------------


def test_callback_tables_are_keyed_by_plugin_name_and_overridable(tmp_path, base):
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n'
                     '[callbacks.spectral]\nevery = 250\naction = "checkpoint"\n')
    recipe = load_recipe(child, ["callbacks.spectral.every=100"])
    spec = recipe.callbacks["spectral"]
    assert spec.name == "spectral" and spec.config.every == 100
    assert spec.config.action == "checkpoint"  # the file's other keys stay
    monitor = spec.create()
    assert monitor.name == "spectral" and monitor.config is spec.config
    table = tomllib.loads(tomli_w.dumps(recipe_to_table(recipe)))
    assert table["callbacks"]["spectral"]["every"] == 100
    assert "name" not in table["callbacks"]["spectral"]
    assert structure_recipe(table) == recipe


def test_a_default_enabled_callback_is_there_when_the_recipe_does_not_name_it(base):
    recipe = load_recipe(base)  # no [callbacks]: the spectral monitor with its defaults
    assert list(recipe.callbacks) == ["spectral"]
    assert recipe.callbacks["spectral"].config.every == 500
    assert "spectral" in recipe_to_table(recipe)["callbacks"]  # written into the run folder


def test_unknown_callback_and_unknown_key_are_one_line_each(tmp_path, base):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "base.toml"\n[callbacks.spectrl]\nevery = 5\n'
                   '[callbacks.spectral]\nevrey = 5\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    lines = info.value.problems
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{bad}: unknown callback 'spectrl' (did you mean 'spectral'?); "
                               "installed: ") and lines[0].endswith(" at callbacks.spectrl")
    assert f"{bad}: unknown key 'evrey' (did you mean 'every'?) at callbacks.spectral" in lines
    with pytest.raises(RecipeError) as info:
        load_recipe(base, ["callbacks.spectral=5"])
    assert info.value.problems == [
        "--set callbacks.spectral=5: wrong type at callbacks.spectral: expected a table (the "
        "settings of callback 'spectral'), got integer 5"]
    with pytest.raises(RecipeError, match=r"--set callbacks.spectral.mass_drop=2: invalid value "
                                          r"at callbacks.spectral.mass_drop: must be a number in "
                                          r"\(0, 1\), got 2.0"):
        load_recipe(base, ["callbacks.spectral.mass_drop=2"])


def test_an_old_spectral_table_loads_as_the_spectral_callback(tmp_path, base):
    old = tmp_path / "old.toml"  # an old run folder's recipe.toml had [spectral]
    old.write_text(base.read_text() + '\n[spectral]\nevery = 7\naction = "checkpoint"\n')
    recipe = load_recipe(old, ["spectral.warmup=3"])  # an old --set key too
    config = recipe.callbacks["spectral"].config
    assert (config.every, config.action, config.warmup) == (7, "checkpoint", 3)
    table = recipe_to_table(recipe)  # written back in the new place
    assert "spectral" not in table and table["callbacks"]["spectral"]["warmup"] == 3
    new = tmp_path / "new.toml"
    new.write_text(base.read_text() + '\n[callbacks.spectral]\nevery = 7\naction = "checkpoint"\n')
    assert load_recipe(new, ["callbacks.spectral.warmup=3"]) == recipe
    with pytest.raises(RecipeError) as info:  # an error in the old table names the new path
        load_recipe(old, ["spectral.evrey=1"])
    assert info.value.problems == ["--set spectral.evrey=1: unknown key 'evrey' (did you mean "
                                   "'every'?) at callbacks.spectral"]
    both = tmp_path / "both.toml"
    both.write_text(new.read_text() + '\n[spectral]\nevery = 3\n')
    with pytest.raises(RecipeError, match=r"both \[spectral\] and \[callbacks.spectral\]"):
        load_recipe(both)
