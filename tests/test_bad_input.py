"""Bad recipes and ``--set`` values through the real command: every section, ``extends`` and
``--set`` (issue 13, points 3, 7, 8 and 11).

Each case goes through ``core.run.main`` twice, as ``RECIPE --dry-run`` and as the real run
(``--set train.iterations=1``), and must: exit 2, name the file (or the ``--set`` argument) the
bad key came from and the key itself on one line, show no traceback, write nothing (no run
folder), and say the same in both modes (the dry run and the real run check the same things, all
of them before anything runs). A representative part goes through real subprocesses
(``python -m core.run``), with a timeout: ``eval.batch_size = 0`` hung forever at the first
evaluation before.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from conftest import REPO
from core.run import main

#: a small valid recipe: every case breaks it in one or more places. (``[spectral]`` is the old
#: name of ``[callbacks.spectral]``: the recipe also loads on the code before either existed.)
BASE = """\
seed = 0
[dataset]
name = "stacked_digits"
num_samples = 64
[architecture]
name = "resnet32"
ch = 4
g_ch = 4
[discriminator.regularizer]
name = "sr_static"
fraction = 0.5
[generator.regularizer]
name = "ssn"
scale = 1.0
[train]
iterations = 2
batch_size = 8
n_critic = 1
[checkpoint]
every = 0
[log]
every = 1
sample_every = 0
grid_size = 4
progress = false
[spectral]
every = 0
[eval]
every = 0
batch_size = 16
best = "modes.modes"
[[eval.metrics]]
name = "modes"
num_samples = 16
[[eval.metrics]]
name = "digits_fid"
num_samples = 16
"""


@dataclasses.dataclass(frozen=True)
class Bad:
    """A broken recipe: ``sets`` (``--set`` values) on ``base.toml`` or on ``child`` (a recipe
    that extends it; ``bytes`` for files that are not UTF-8). ``expect``: one entry per problem,
    ``(origin, key, *words)``: a line naming that origin ("base", "child" or the ``--set``
    argument) and the key (after " at ") holds every word."""

    id: str
    sets: tuple[str, ...] = ()
    child: str | bytes | None = None
    expect: tuple[tuple[str, ...], ...] = ()
    base: str | bytes = BASE
    #: what the real run adds before ``sets`` to keep it tiny, were the mistake not caught
    tiny: tuple[str, ...] = ("train.iterations=1",)

    def __str__(self) -> str:
        return self.id


def S(text: str, key: str | None = None, *words: str, more: tuple[str, ...] = ()) -> Bad:
    """One ``--set`` mistake, blamed on that ``--set`` at its own key (or ``key``); ``more``
    are valid ``--set`` values given before it (a plugin's name)."""
    own = text.split("=", 1)[0]
    return Bad(id=text, sets=(*more, text), expect=((f"--set {text}", key or own, *words),))


def F(id: str, child: str | bytes, *expect: tuple[str, ...], base: str | bytes = BASE,
      sets: tuple[str, ...] = (), tiny: tuple[str, ...] = ("train.iterations=1",)) -> Bad:
    """A mistake in a recipe file that extends ``base.toml`` (or in the base)."""
    return Bad(id=id, child=child, expect=expect, base=base, sets=sets, tiny=tiny)


CASES = [
    # -- [train] -------------------------------------------------------------------------------
    S("train.lr_d=nan", None, "finite number > 0", "nan"),
    S("train.lr_g=inf", None, "finite number > 0", "inf"),
    S("train.lr_d=-1e-4", None, "> 0"),
    S("train.lr_g=0", None, "> 0"),
    S("train.betas=[0.5, 1.0]", "train.betas.1", "[0, 1)", "1.0"),
    S("train.betas=[-0.1, 0.9]", "train.betas.0", "[0, 1)"),
    S("train.betas=[0.5]", "train.betas", "array of 2"),
    S("train.betas=fast", "train.betas", "an array"),
    S("train.n_critic=0", None, ">= 1"),
    S("train.num_workers=-1", None, ">= 0"),
    S("train.iterations=0", None, ">= 1"),
    S("train.iterations=-5", None, ">= 1"),
    S("train.iterations=1.5", None, "integer"),
    S("train.micro_batch_size=-1", None, ">= 0"),
    S("train.micro_batch_size=3", None, "per-process batch 8", "valid caps: 1, 2",
      "train.batch_size"),
    S("train.batch_size=0", None, ">= 1"),
    S("train.g_batch_multiplier=0", None, ">= 1"),
    S("train.lr_decay=cosine", None, "'linear'"),
    S("train.mixed_precision=fp8", None, "'bf16'"),
    S("train.cpu=yes", None, "boolean"),
    S("train.lr=1e-4", "train", "unknown key 'lr'"),
    S("train=5", "train", "expected a table", "integer 5"),
    # -- top-level keys ----------------------------------------------------------------------
    S("seed=-1", None, "[0, 4294967295]"),
    S("seed=1099511627776", None, "[0, 4294967295]", "torch.manual_seed"),
    S("seed=abc", None, "integer"),
    S("data_root=7", None, "string"),
    # -- [checkpoint], [log] -------------------------------------------------------------------
    S("checkpoint.every=-1", None, ">= 0"),
    S("checkpoint.keep=0", None, ">= 1"),
    S("log.every=-1", None, ">= 1"),
    S("log.every=0", None, ">= 1"),
    S("log.sample_every=-2", None, ">= 0"),
    S("log.grid_size=0", None, ">= 1"),
    S("log.trackers=wandb", None, "an array", "string 'wandb'"),
    S("log.trackers=['jsonl', 'wandbb']", "log.trackers.1", "'wandb'"),
    S("log.progress=2", None, "boolean"),
    # -- [eval] --------------------------------------------------------------------------------
    S("eval.batch_size=0", None, ">= 1"),
    S("eval.every=-1", None, ">= 0"),
    S("eval.best=modes.mode", None, "no score 'mode'", "modes, kl, rejected"),
    S("eval.best=fid.fid", None, "no metric of eval.metrics", "modes, digits_fid"),
    S("eval.best=modes", None, "'metric.key'"),
    S("eval.best_mode=up", None, "'max'"),
    S("eval.metrics.0.num_samples=0", None, ">= 1"),
    S("eval.metrics.1.num_samples=1", None, ">= 2"),
    S("eval.metrics.1.reference_samples=-1", None, ">= 0"),
    S("eval.metrics.0.name=fidd", "eval.metrics.0", "unknown metric 'fidd'"),
    S("eval.metrics.0.num_samples=1", None, ">= 2",
      more=("eval.metrics.0.name=fid",)),
    S("eval.metrics.0.mode=bilinear", None, "'legacy_tensorflow'",
      more=("eval.metrics.0.name=fid",)),
    Bad("is: splits > num_samples", sets=("eval.metrics.0.name=is", "eval.metrics.0.num_samples=5"),
        expect=(("base", "eval.metrics.0.splits", "<= num_samples (5)",
                 "--set eval.metrics.0.num_samples=5"),)),
    S("eval.metrics.0.num_samples=-1", None, ">= 1", more=("eval.metrics.0.name=d_stats",)),
    Bad("eval.metrics=[]", sets=("eval.metrics=[]",),
        expect=(("base", "eval.best", "eval.metrics is empty", "[eval.metrics: --set"),)),
    # -- [run] ---------------------------------------------------------------------------------
    S("run.name=../escaped", None, "no '/'", "inside output_dir"),
    S("run.name=a/b", None, "no '/'"),
    S("run.name=..", None, "'..'"),
    S("run.name=x\\y", None, "no '/'"),
    # -- [dataset] -----------------------------------------------------------------------------
    S("dataset.num_samples=-1", None, ">= 1"),
    S("dataset.num_samples=0", None, ">= 1"),
    S("dataset.seed=-3", None, "[0, 4294967295]"),
    S("dataset.resolution=0", None, ">= 1", more=("dataset.name=cifar10",)),
    S("dataset.resize_filter=lanczos", None, "'bicubic'", more=("dataset.name=cifar10",)),
    S("dataset.source_split=all", None, "'unlabeled'", more=("dataset.name=stl10",)),
    S("dataset.num_classes=-1", None, ">= 0", more=("dataset.name=imagenet",)),
    S("dataset.crop=0", None, ">= 1", more=("dataset.name=celeba", "dataset.resolution=32")),
    S("dataset.name=mnist", "dataset", "unknown dataset 'mnist'"),
    # -- [architecture] ------------------------------------------------------------------------
    S("architecture.ch=0", None, ">= 1"),
    S("architecture.g_ch=-3", None, ">= 1"),
    S("architecture.z_dim=0", None, ">= 1"),
    S("architecture.num_classes=-1", None, ">= 0"),
    S("architecture.bn_eps=nan", None, "(0, 1)"),
    S("architecture.name=resnet128", "architecture.name", "128x128", "32x32", "dataset.name"),
    S("architecture.resolution=48", None, "48x48", "32x32", "dataset.name",
      more=("architecture.name=cnn",)),
    S("architecture.resolution=16", None, "16x16", "32x32", "dataset.resolution",
      more=("architecture.name=cnn",)),  # a size the dataset offers: its key is named
    S("architecture.g_ch=12", None, "multiple of 8", more=("architecture.name=cnn",)),
    S("architecture.resolution=40", None, "8, 16, 32, 48, 64", more=("architecture.name=cnn",)),
    S("architecture.block=bssn", None, "'sngan', 'bsn'",
      more=("architecture.name=resnet128", "dataset.name=imagenet")),
    # -- [discriminator] / [generator] regularizers --------------------------------------------
    S("discriminator.regularizer.fraction=0", None, "(0, 1]"),
    S("discriminator.regularizer.fraction=1.5", None, "(0, 1]"),
    S("discriminator.regularizer.fraction=nan", None, "(0, 1]"),
    S("discriminator.regularizer.every=0", None, ">= 1"),
    S("discriminator.regularizer.start=-1", None, ">= 0"),
    S("discriminator.regularizer.layers=conv", None, "an array"),
    S("discriminator.regularizer.layers=['bn']", None, "unknown layer type"),
    S("discriminator.regularizer.mode=project", None, "'projection'"),
    S("generator.regularizer.scale=nan", None, "finite number > 0"),
    S("generator.regularizer.scale=-1", None, "> 0", more=("generator.regularizer.name=bssn",)),
    S("generator.regularizer.name=sn_typo", "generator.regularizer", "unknown regularizer"),
    S("discriminator.regularizer.gamma=nan", None, "> 0",
      more=("discriminator.regularizer.name=r1",)),
    S("discriminator.regularizer.every=0", None, ">= 1",
      more=("discriminator.regularizer.name=wgan_gp",)),
    # -- [loss] --------------------------------------------------------------------------------
    S("loss.name=hinje", "loss", "unknown loss 'hinje'"),
    S("loss.margin=1", "loss", "unknown key 'margin'", more=("loss.name=hinge",)),
    # -- [callbacks.spectral] ------------------------------------------------------------------
    S("callbacks.spectral.every=-1", None, ">= 0"),
    S("callbacks.spectral.mass_drop=1.5", None, "(0, 1)"),
    S("callbacks.spectral.mass_drop=nan", None, "(0, 1)"),
    S("callbacks.spectral.mass_drop=-0.1", None, "(0, 1)"),
    S("callbacks.spectral.min_layers=0", None, ">= 1"),
    S("callbacks.spectral.warmup=-1", None, ">= 0"),
    S("callbacks.spectral.switch_to=sr_dinamic", None, "unknown regularizer 'sr_dinamic'",
      more=("callbacks.spectral.action=switch",)),
    S("callbacks.spectral.switch_config={every = 0}", None, "regularizer 'sr_dynamic'", ">= 1",
      more=("callbacks.spectral.action=switch",)),
    S("callbacks.spectral.action=panic", None, "'switch'"),
    S("callbacks.spectrl.every=1", "callbacks.spectrl", "unknown callback"),
    S("spectral.mass_drop=-1", "callbacks.spectral.mass_drop", "(0, 1)"),  # the old table name
    # -- files: extends, bases, encodings --------------------------------------------------------
    F("child: nan lr", 'extends = "base.toml"\n[train]\nlr_d = nan\n',
      ("child", "train.lr_d", "finite number > 0")),
    F("base: empty grid",
      'extends = "base.toml"\n[train]\nlr_d = 1e-4\n', ("base", "log.grid_size", ">= 1"),
      base=BASE.replace("grid_size = 4", "grid_size = 0")),
    F("child: train is not a table", 'extends = "base.toml"\ntrain = 5\n',
      ("child", "train", "expected a table"), tiny=()),  # a --set train.KEY would replace it
    F("child: resolution of a cnn", 'extends = "base.toml"\n[architecture]\nname = "cnn"\n'
      'resolution = 64\n', ("child", "architecture.resolution", "64x64", "dataset.name: ")),
    F("child: missing base", 'extends = "nowhere.toml"\n', ("child", "", "nowhere.toml")),
    F("child: extends is not a name", 'extends = 5\n', ("child", "", "'extends'")),
    F("child: not TOML", 'extends = "base.toml"\n[train\n', ("child", "", "not valid TOML")),
    F("child: not UTF-8", b'extends = "base.toml"\n# caf\xe9\n[train]\nlr_d = 1e-4\n',
      ("child", "", "not valid UTF-8", "line 2")),
    F("base: not UTF-8", 'extends = "base.toml"\n',
      ("base", "", "not valid UTF-8", "line 1"), base=b"# \xff\xfe\n" + BASE.encode()),
    F("extends: a cycle", 'extends = "base.toml"\n', ("child", "", "cycle"),
      base='extends = "child.toml"\n' + BASE),
    F("child and --set: each blamed on its own", 'extends = "base.toml"\n[log]\nevery = -1\n',
      ("child", "log.every", ">= 1"), ("--set train.n_critic=0", "train.n_critic", ">= 1"),
      sets=("train.n_critic=0",)),
]


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _recipe(case: Bad, folder: Path) -> tuple[Path, dict[str, str]]:
    """The case's recipe file under ``folder`` and the names its origins are shown by."""
    base = _write(folder / "base.toml", case.base)
    recipe = base if case.child is None else _write(folder / "child.toml", case.child)
    return recipe, {"base": str(base), "child": str(folder / "child.toml")}


def _problem_lines(stderr: str) -> list[str]:
    lines = [line.removeprefix("specreg: error: ") for line in stderr.splitlines()]
    return [line for line in lines if line and not line.endswith("problems in the recipe:")]


def check_reported(case: Bad, stderr: str, names: dict[str, str]) -> None:
    """Every expected problem on a line of its own, with its origin and key; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = _problem_lines(stderr)
    assert len(lines) == len(case.expect), stderr
    for origin, key, *words in case.expect:
        shown = names.get(origin, origin)
        hits = [line for line in lines if line.startswith(f"{shown}: ") and
                (not key or f" at {key}:" in line or line.endswith(f" at {key}") or
                 f" at {key} " in line)]
        assert hits, f"no line names {shown} and {key!r}:\n{stderr}"
        for word in words:
            assert any(word in line for line in hits), f"{word!r} missing:\n{stderr}"


def _run_in_process(recipe: Path, case: Bad, run_dir: Path, dry: bool, capsys) -> tuple[int, str]:
    if dry:
        argv = [str(recipe), *[a for s in case.sets for a in ("--set", s)], "--dry-run"]
    else:  # the real run, on a tiny budget; the case's own values come last and win
        argv = [str(recipe), *[a for s in (*case.tiny, *case.sets) for a in ("--set", s)],
                "--run-dir", str(run_dir)]
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def test_the_base_recipe_is_valid(tmp_path, capsys):
    """The cases break a recipe that is otherwise fine."""
    recipe = _write(tmp_path / "base.toml", BASE)
    assert main([str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
    assert "- OK" in capsys.readouterr().out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_exits_2_naming_file_and_key_before_anything_runs(case, tmp_path, capsys):
    recipe, names = _recipe(case, tmp_path)
    run_dir = tmp_path / "run"
    dry_code, dry_err = _run_in_process(recipe, case, run_dir, True, capsys)
    assert dry_code == 2, dry_err
    check_reported(case, dry_err, names)
    code, err = _run_in_process(recipe, case, run_dir, False, capsys)
    assert code == 2, err
    check_reported(case, err, names)
    assert not run_dir.exists()  # nothing was written: every check ran before the run
    assert _problem_lines(err) == _problem_lines(dry_err)  # the same checks, the same words


def test_there_are_enough_cases_across_every_section():
    keys = {key.split(".")[0] for case in CASES for _, key, *_ in case.expect if key}
    assert len(CASES) >= 60
    assert {"train", "seed", "checkpoint", "log", "eval", "run", "dataset", "architecture",
            "discriminator", "generator", "loss", "callbacks"} <= keys
    assert sum(case.child is not None for case in CASES) >= 8  # files: extends, bases, encodings


# ---------------------------------------------------------------------------------------------
# Many mistakes at once (point 7): all reported, each with its file and key
# ---------------------------------------------------------------------------------------------

#: a child of base.toml with one mistake in every section, some of them the issue's list.
MANY = """\
extends = "base.toml"
seed = 99999999999
[dataset]
num_samples = -64
[architecture]
name = "cnn"
resolution = 48
[discriminator.regularizer]
fraction = 2.0
every = 0
[generator.regularizer]
scale = nan
[train]
lr_d = nan
lr_g = -inf
betas = [0.0, 1.0]
n_critic = 0
num_workers = -1
[log]
grid_size = 0
[callbacks.spectral]
mass_drop = -0.5
[eval]
batch_size = 0
"""

#: (key, words) of each problem in MANY plus the --set ones: 16 problems.
MANY_EXPECTED = [
    ("child", "seed"), ("child", "dataset.num_samples"),
    ("child", "discriminator.regularizer.fraction"), ("child", "discriminator.regularizer.every"),
    ("child", "generator.regularizer.scale"), ("child", "train.lr_d"), ("child", "train.lr_g"),
    ("child", "train.betas.1"), ("child", "train.n_critic"), ("child", "train.num_workers"),
    ("child", "log.grid_size"), ("child", "callbacks.spectral.mass_drop"),
    ("child", "eval.batch_size"), ("--set train.iterations=0", "train.iterations"),
    ("--set run.name=../escaped", "run.name"), ("--set checkpoint.every=-1", "checkpoint.every"),
]
MANY_SETS = ("train.iterations=0", "run.name=../escaped", "checkpoint.every=-1")


def test_every_mistake_of_a_recipe_is_reported_at_once(tmp_path, capsys):
    case = Bad("many", sets=MANY_SETS, child=MANY, expect=tuple(MANY_EXPECTED))
    recipe, names = _recipe(case, tmp_path)
    code, err = _run_in_process(recipe, case, tmp_path / "run", True, capsys)
    assert code == 2
    assert err.startswith(f"specreg: error: {len(MANY_EXPECTED)} problems in the recipe:")
    check_reported(case, err, names)


def test_the_resolution_check_waits_for_a_buildable_architecture(tmp_path, capsys):
    """With the architecture's own values wrong, its resolution is not compared (one line)."""
    case = Bad("cnn ch 0", sets=("architecture.name=cnn", "architecture.resolution=48",
                                 "architecture.ch=0"),
               expect=(("--set architecture.ch=0", "architecture.ch", ">= 1"),))
    recipe, names = _recipe(case, tmp_path)
    code, err = _run_in_process(recipe, case, tmp_path / "run", True, capsys)
    assert code == 2
    check_reported(case, err, names)


# ---------------------------------------------------------------------------------------------
# The shared validators (core.validators), as a plugin author uses them
# ---------------------------------------------------------------------------------------------


def author_config() -> type:
    """A Config as a plugin author writes it with the shared validators."""
    from core.validators import (each, file_name, fraction, int_in, number_in, one_of,
                                 positive_int, positive_number)

    @attrs.define
    class AuthorConfig:
        rate: float = attrs.field(default=1.0, validator=positive_number)
        share: float = attrs.field(default=0.5, validator=fraction)
        beta: float = attrs.field(default=0.0, validator=number_in(0, 1, high_open=True))
        steps: int = attrs.field(default=1, validator=positive_int)
        seed: int = attrs.field(default=0, validator=int_in(0, 9))
        kind: str = attrs.field(default="a", validator=one_of(("a", "b")))
        weights: list = attrs.field(factory=lambda: [1.0], validator=each(positive_number))
        name: str = attrs.field(default="", validator=file_name)

    return AuthorConfig


@pytest.mark.parametrize("field, value, words", [
    ("rate", math.nan, "must be a finite number > 0, got nan"),
    ("rate", math.inf, "must be a finite number > 0, got inf"),
    ("rate", 0.0, "got 0.0"),
    ("rate", True, "got True"),
    ("rate", "1", "got '1'"),
    ("share", 0.0, "(0, 1]"),
    ("share", 1.0 + 1e-9, "(0, 1]"),
    ("beta", 1.0, "[0, 1)"),
    ("steps", 0, ">= 1"),
    ("steps", 1.0, ">= 1"),
    ("seed", 10, "[0, 9]"),
    ("kind", "c", "one of 'a', 'b', got 'c'"),
    ("weights", [1.0, -2.0], "weights.1 must be a finite number > 0"),
    ("weights", "1", "must be an array"),
    ("name", "../x", "'..'"),
    ("name", "a/b", "'/'"),
    ("name", ".", "plain folder name"),
])
def test_shared_validators_refuse_with_one_clear_message(field, value, words):
    from core.validators import ConfigValueError

    with pytest.raises(ConfigValueError) as info:
        author_config()(**{field: value})
    assert words in str(info.value) and str(info.value).startswith("AuthorConfig: ")
    assert isinstance(info.value, ValueError)  # cattrs collects it like its own errors


def test_shared_validators_accept_the_edges():
    author_config()(rate=1e-30, share=1.0, beta=0.0, steps=1, seed=9, weights=[], name="run-1")


def test_a_plugin_config_error_names_the_registered_plugin():
    from core.registry import get_registry
    from core.validators import ConfigValueError

    cls = get_registry().regularizers["ssn"]
    with pytest.raises(ConfigValueError, match=r"^ssn: scale must be a finite number > 0, got "
                                               r"nan$"):
        cls.Config(scale=math.nan)


def test_declared_metric_scores_are_the_computed_ones():
    """``eval.best`` is checked against ``value_keys``: they must be what compute returns."""
    import numpy as np

    from core.registry import get_registry
    from plugins.metrics.modes import mode_coverage

    metrics = get_registry().metrics
    values = mode_coverage(np.array([[1, 2, 3]]), np.array([[True, True, True]]))
    assert set(values) == set(metrics["modes"].value_keys)
    for name in ("modes", "digits_fid", "fid", "is", "d_stats"):
        assert metrics[name].primary in metrics[name].value_keys, name


# ---------------------------------------------------------------------------------------------
# The real command, in subprocesses with a timeout
# ---------------------------------------------------------------------------------------------


def cli(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m core.run ARGS``; a hang fails the test (it does not wait forever)."""
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "core.run", *args], cwd=REPO,
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python -m core.run {' '.join(args)} hung (> {timeout} s): {exc.stderr}")


def _sets(sets) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_eval_batch_size_0_stops_before_training_instead_of_hanging(tmp_path):
    """Point 3: the first evaluation hung forever; now the real run refuses at once."""
    recipe = _write(tmp_path / "base.toml", BASE.replace("every = 0\nbatch_size = 16",
                                                         "every = 1\nbatch_size = 16"))
    out = cli([str(recipe), "--set", "train.iterations=1", "--set", "eval.batch_size=0",
               "--run-dir", str(tmp_path / "run")], timeout=240)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("specreg: error: --set eval.batch_size=0: invalid value at "
                                  "eval.batch_size: must be an integer >= 1, got 0")
    assert not (tmp_path / "run").exists()


def test_many_mistakes_through_the_real_command_dry_run_and_real_run_alike(tmp_path):
    """Points 7 and 8: every mistake reported before anything runs, the same by ``--dry-run``
    and by the real run, each with its file and key; nothing written, nothing outside
    output_dir."""
    case = Bad("many", sets=MANY_SETS, child=MANY, expect=tuple(MANY_EXPECTED))
    recipe, names = _recipe(case, tmp_path)
    output = ["--set", f"run.output_dir={tmp_path / 'runs'}"]
    dry = cli([str(recipe), *output, *_sets(MANY_SETS), "--dry-run"])
    real = cli([str(recipe), *output, *_sets(MANY_SETS)])
    for out in (dry, real):
        assert out.returncode == 2, out.stderr
        check_reported(case, out.stderr, names)
    assert _problem_lines(dry.stderr) == _problem_lines(real.stderr)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.slow  # three process starts; each point is also in the in-process cases
def test_errors_name_the_right_file_through_the_real_command(tmp_path):
    """Point 11: ``--set train=5`` is blamed on itself, not on the base; widths, sample counts,
    ``eval.best`` and the batch arithmetic name the recipe file they come from;
    ``g_batch_multiplier = 0`` is a bad value, not a non-finite loss; invalid UTF-8 in a base is
    one line."""
    base = _write(tmp_path / "base.toml", BASE)
    child = _write(tmp_path / "child.toml", 'extends = "base.toml"\n[architecture]\nch = 0\n'
                   '[eval]\nbest = "modes.mode"\n[[eval.metrics]]\nname = "modes"\n'
                   'num_samples = 0\n')
    out = cli([str(child), "--set", "train=5", "--dry-run"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert sorted(_problem_lines(out.stderr)) == sorted([
        "--set train=5: wrong type at train: expected a table, got integer 5",
        f"{child}: invalid value at architecture.ch: must be an integer >= 1, got 0",
        f"{child}: invalid value at eval.metrics.0.num_samples: must be an integer >= 1, got 0"])

    out = cli([str(child), "--set", "architecture.ch=4", "--set", "eval.metrics.0.num_samples=8",
               "--set", "train.micro_batch_size=3", "--set", "train.g_batch_multiplier=0",
               "--run-dir", str(tmp_path / "run")])  # the real run
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "non-finite" not in out.stderr and not (tmp_path / "run").exists()
    assert sorted(_problem_lines(out.stderr)) == sorted([
        f"{child}: invalid value at eval.best: metric 'modes' has no score 'mode' (its scores: "
        f"modes, kl, rejected), got 'modes.mode'",
        f"--set train.micro_batch_size=3: invalid value at train.micro_batch_size: must divide "
        f"the per-process batch 8 (= batch_size 8 / 1 process(es)); valid caps: 1, 2 (or 0: no "
        f"cap), got 3 [train.batch_size: {base}]",
        "--set train.g_batch_multiplier=0: invalid value at train.g_batch_multiplier: must be an "
        "integer >= 1, got 0"])

    _write(base, b"# \xff\n" + BASE.encode())
    out = cli([str(child), "--dry-run"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (f"specreg: error: {base}: not valid UTF-8 (TOML files are "
                                  f"UTF-8): byte 0xff at line 1, byte offset 2")


#: a representative case of each section, each through the real command (slow: one process
#: start per case and mode).
SUBPROCESS_CASES = [c for c in CASES if c.id in {
    "train.lr_d=nan", "train.betas=[0.5, 1.0]", "seed=1099511627776", "log.grid_size=0",
    "log.trackers=wandb", "eval.best=fid.fid", "run.name=../escaped", "dataset.num_samples=-1",
    "architecture.name=resnet128", "discriminator.regularizer.every=0",
    "generator.regularizer.scale=nan", "callbacks.spectral.mass_drop=1.5",
    "child: not UTF-8", "child: train is not a table"}]


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=str)
def test_bad_input_through_subprocesses(case, tmp_path):
    recipe, names = _recipe(case, tmp_path)
    dry = cli([str(recipe), *_sets(case.sets), "--dry-run"])
    real = cli([str(recipe), *_sets((*case.tiny, *case.sets)), "--run-dir", str(tmp_path / "run")])
    for out in (dry, real):
        assert out.returncode == 2, out.stderr
        check_reported(case, out.stderr, names)
    assert not (tmp_path / "run").exists()
