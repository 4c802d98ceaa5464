"""The recipe zoo: the committed recipes are what ``zoo/generate.py`` writes, they cover every
setting of the SR paper's Table I with the paper's batch, width and regularizer, and every recipe
in ``zoo/`` loads unmodified and passes ``--dry-run`` (at tiny widths, for speed).

    python -m pytest tests/test_zoo.py -q
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from core.dry_run import describe_regularized, dry_run
from core.recipe import load_recipe
from core.layers import regularized_layers

ZOO = REPO / "zoo"
#: every recipe of the zoo (study files, zoo/studies/*_study.toml, are not recipes: test_study.py)
RECIPES = sorted(p for p in ZOO.rglob("*.toml") if not p.name.endswith("_study.toml"))

#: Overrides that shrink each architecture for the dry run (its keys must exist in its Config).
TINY = {
    "resnet32": ["architecture.ch=4", "architecture.g_ch=4"],
    "resnet128": ["architecture.ch=4", "architecture.g_ch=4"],
    "cnn": ["architecture.ch=4", "architecture.g_ch=8"],  # g_ch: a multiple of 8
}

#: The SR paper's Table I (group, batch, CH, dataset), typed in from the paper, plus E16-128
#: (appendix Fig. 20 only).
TABLE_I = (
    [("A", b, 128, "cifar10") for b in (16, 32, 64, 128, 256, 512, 1024)]
    + [("B", b, 64, "cifar10") for b in (8, 16, 32, 64, 128, 256)]
    + [("C", b, 32, "cifar10") for b in (8, 16, 32, 64)]
    + [("D", b, 256, "cifar10") for b in (128, 256, 512)]
    + [("E", 16, 128, "stl10"), ("E", 64, 128, "stl10"), ("E", 256, 128, "stl10"),
       ("E", 256, 64, "stl10"), ("E", 256, 32, "stl10"),
       ("E", 512, 64, "imagenet"), ("E", 2048, 64, "imagenet")]
)
SR_NAME = re.compile(r"(cifar10|stl10|imagenet)_([A-E])(\d+)-(\d+)(?:_(sn|sr))?\.toml")


def _generator():
    spec = importlib.util.spec_from_file_location("zoo_generate", ZOO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def _id(path: Path) -> str:
    return path.relative_to(ZOO).as_posix()


# ---------------------------------------------------------------------------------------------
# Generated files
# ---------------------------------------------------------------------------------------------


def test_committed_recipes_equal_generated(tmp_path):
    generator = _generator()
    written = generator.generate(tmp_path)
    assert len(written) > 60
    stale = {_id(p) for p in RECIPES
             if p.parent in (ZOO, ZOO / "bssn") and p.name not in generator.HAND_WRITTEN}
    for path in written:
        relative = path.relative_to(tmp_path).as_posix()
        committed = ZOO / relative
        assert committed.is_file(), f"zoo/{relative} is not committed: run python zoo/generate.py"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), \
            f"zoo/{relative} differs from what zoo/generate.py writes: run it"
        stale.discard(relative)
    assert not stale, f"recipes in generated folders that generate.py no longer writes: {stale}"


def test_sr_recipes_cover_table_i_with_the_papers_settings():
    found = {}
    for path in ZOO.glob("*.toml"):
        match = SR_NAME.fullmatch(path.name)
        if match:
            dataset, group, batch, ch, reg = match.groups()
            found.setdefault((group, int(batch), int(ch), dataset), set()).add(reg or "sr")
    assert sorted(found) == sorted(TABLE_I)
    assert all(regs == {"sn", "sr"} for regs in found.values()), found

    for (group, batch, ch, dataset), regs in found.items():
        for reg in regs:
            name = f"{dataset}_{group}{batch}-{ch}" + ("" if (dataset, reg) == ("imagenet", "sr")
                                                      else f"_{reg}") + ".toml"
            recipe = load_recipe(ZOO / name)
            t, d_reg = recipe.train, recipe.discriminator.regularizer
            assert recipe.dataset.name == dataset, name
            assert (t.batch_size, recipe.architecture.config.ch) == (batch, ch), name
            assert recipe.loss.name == "hinge" and tuple(t.betas) == (0.0, 0.9), name
            if dataset == "imagenet":  # SPEC §4, right column
                assert recipe.architecture.name == "resnet128", name
                assert recipe.architecture.config.num_classes == 1000, name
                assert recipe.architecture.config.block == "sngan", name  # 17 convs
                assert (t.lr_g, t.lr_d, t.n_critic) == (1e-4, 4e-4, 1), name
                # the authors' config.yml (issue 11 point 2): n_gen_samples = batchsize,
                # iteration_decay_start = iteration (no decay); betas stay the paper's
                assert (t.lr_decay, t.g_batch_multiplier) == ("none", 1), name
                assert recipe.generator.regularizer.name == "sn", name
                expected = "sn" if reg == "sn" else "sr_dynamic"
                assert d_reg.name == expected, name
                if expected == "sr_dynamic":
                    assert d_reg.config.start == (40_000 if batch == 2048 else 0), name
            else:  # SPEC §4, left column
                assert recipe.architecture.name == "resnet32", name
                assert recipe.dataset.config.resolution == 32, name
                assert (recipe.architecture.config.g_ch, recipe.architecture.config.num_classes) \
                    == (256, 0), name
                assert (t.lr_g, t.lr_d, t.n_critic, t.iterations) == (2e-4, 2e-4, 5, 50_000), name
                assert (t.lr_decay, t.g_batch_multiplier) == ("linear", 2), name
                assert recipe.generator.regularizer is None, name
                assert d_reg.name == ("sn" if reg == "sn" else "sr_static"), name
                if reg == "sr":
                    assert d_reg.config.fraction == 0.5, name


def test_headers_never_place_a_setting_in_a_table_that_lacks_it():
    """Issue 11 point 9: E16-128 is not in Tables I/II (only in the appendix's Fig. 20), so its
    recipes' headers must not call it a "Table I setting"; the others' must."""
    in_table_i = {(g, b, c, d) for g, b, c, d in TABLE_I if (g, b, c) != ("E", 16, 128)}
    for path in ZOO.glob("*.toml"):
        match = SR_NAME.fullmatch(path.name)
        if not match:
            continue
        dataset, group, batch, ch, _ = match.groups()
        header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines()
                          if line.startswith("#"))
        listed = (group, int(batch), int(ch), dataset) in in_table_i
        assert ("Table I setting" in header) == listed, (path.name, header)
        assert ("not in Tables I/II" in header) == (not listed), (path.name, header)


def test_bssn_recipes_cover_the_four_normalizations():
    names = {p.name for p in (ZOO / "bssn").glob("*.toml")}
    for data_net in ("cifar10_cnn", "stl10_cnn", "celeba_cnn", "imagenet_resnet128"):
        for reg in ("sn", "ssn", "bsn", "bssn"):
            name = f"{data_net}_{reg}.toml"
            assert name in names
            recipe = load_recipe(ZOO / "bssn" / name)
            assert recipe.discriminator.regularizer.name == reg
            assert recipe.generator.regularizer is None
    stl = load_recipe(ZOO / "bssn" / "stl10_cnn_sn.toml")
    assert stl.dataset.config.resolution == stl.architecture.config.resolution == 48
    celeba = load_recipe(ZOO / "bssn" / "celeba_cnn_sn.toml")
    assert [m.name for m in celeba.eval.metrics] == ["fid"]  # no IS on CelebA (Table 1)


# ---------------------------------------------------------------------------------------------
# Every recipe loads and dry-runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_and_dry_runs(path):
    recipe = load_recipe(path)  # valid as committed
    overrides = TINY[recipe.architecture.name]
    small = load_recipe(path, overrides)
    plan = dry_run(small, str(path), processes=1, check_data=False)  # data: not here
    assert plan.splitlines()[-1].endswith("- OK"), plan
    batch = recipe.train.batch_size
    cap = recipe.train.micro_batch_size
    micro = min(cap, batch) if cap else batch
    assert f"global batch {batch} = micro-batch {micro} x 1 process(es) x {batch // micro} " \
           f"accumulation step(s)" in plan, plan
    d_reg = recipe.discriminator.regularizer
    assert (f"D: {d_reg.name} on " if d_reg else "D: none") in plan, plan


def test_imagenet_plan_splits_the_global_batch_over_processes():
    recipe = load_recipe(ZOO / "imagenet_E2048-64.toml", TINY["resnet128"])
    plan = dry_run(recipe, "zoo/imagenet_E2048-64.toml", processes=8, check_data=False)
    # 2048 = 64 per micro-batch x 8 processes x 4 accumulation steps; G draws as many (the
    # authors' config.yml: n_gen_samples = batchsize)
    assert "global batch 2048 = micro-batch 64 x 8 process(es) x 4 accumulation step(s)" in plan
    assert "generator batch 2048 = 64 x 8 x 4" in plan


IMAGENET = sorted(ZOO.glob("imagenet_*.toml")) + sorted((ZOO / "bssn").glob("imagenet_*.toml"))


@pytest.mark.parametrize("path", IMAGENET, ids=_id)
def test_imagenet_discriminators_regularize_the_authors_convs(path):
    """Unmodified (ch 64) discriminators: the SR paper's 17 conv layers (layer_0..layer_16,
    SN-GAN's blocks); the BSSN recipes the BSSN authors' 18 (a 1x1 shortcut in every block,
    issue 11 point 3)."""
    recipe = load_recipe(path)
    bssn = path.parent.name == "bssn"
    assert recipe.architecture.config.block == ("bsn" if bssn else "sngan")
    torch.manual_seed(0)
    D = recipe.architecture.create().build_discriminator()
    D = recipe.discriminator.regularizer.create().apply(D)
    convs = [n for n, m in regularized_layers(D) if isinstance(m, torch.nn.Conv2d)]
    n_conv = 18 if bssn else 17
    assert len(convs) == n_conv
    assert (D.b6.sc is not None) == bssn
    layers = n_conv + 1 + (1 if recipe.architecture.config.num_classes else 0)
    assert describe_regularized(D).startswith(f"{layers} layers ({n_conv} conv, 1 linear")


@pytest.mark.slow
def test_cli_dry_run_of_e2048_prints_the_batch_arithmetic():
    result = run_cli(["zoo/imagenet_E2048-64.toml", "--dry-run", "--ignore-data"], env={"WORLD_SIZE": "1"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "global batch 2048 = micro-batch 64 x 1 process(es) x 32 accumulation step(s)" in out
    assert "generator batch 2048 = 64 x 1 x 32" in out
    assert "D: sr_dynamic on 19 layers (17 conv, 1 linear, 1 embedding)" in out
    assert "G: sn on " in out
    assert "- OK" in out
