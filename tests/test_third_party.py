"""Third-party plugins end to end: the listing, the training loop's loss-term hook, and the example
package ``examples/specreg-orthogonal`` installed for real with pip into a throwaway virtual
environment (with a deliberately broken copy beside it), trained from its recipe, checked by the
conformance kit, and uninstalled.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import core.registry
from conftest import REPO, write_distribution
from core.listing import format_plugins, plugin_table, print_plugins
from core.registry import Provider, get_registry
from core.recipe import structure_recipe
from core.layers import weight_layers
from core.train import build_trainer, make_accelerator

EXAMPLE = REPO / "examples" / "specreg-orthogonal"

TWO_KINDS = '''
import attrs
from core.hookspecs import hookimpl
from core.interfaces import Loss, Regularizer

class Nothing(Regularizer):
    """Leaves the network as it is."""
    @attrs.define
    class Config:
        pass
    def apply(self, module):
        return module

class Least(Loss):
    """Least squares (Mao et al. 2017)."""
    @attrs.define
    class Config:
        pass
    def discriminator_loss(self, real, fake):
        return ((real - 1) ** 2).mean() + ((fake + 1) ** 2).mean()
    def generator_loss(self, fake):
        return ((fake - 1) ** 2).mean()

@hookimpl
def register_regularizers(register):
    register("nothing_test", Nothing)

@hookimpl
def register_losses(register):
    register("least_test", Least)
'''


@pytest.fixture
def own_registry(monkeypatch):
    """The process-wide registry rebuilt for this test (and the previous one back afterwards)."""
    monkeypatch.setattr(core.registry, "_REGISTRY", None)
    monkeypatch.delenv("SPECREG_STRICT_PLUGINS", raising=False)
    yield


def test_listing_shows_each_distribution_version_names_per_kind_and_failures(
        plugin_path, own_registry, capsys):
    write_distribution(plugin_path, "specreg-two", "specreg_two", TWO_KINDS, version="2.3")
    write_distribution(plugin_path, "specreg-broken", "specreg_broken",
                       "import specreg_missing_dependency\n", entry_point="broken")
    registry = get_registry()
    capsys.readouterr()
    text = format_plugins(registry)
    lines = text.splitlines()
    assert lines[0].startswith("specreg ") and lines[0].endswith("(built-in)")
    assert any(line.split() == ["plugins.losses.hinge", "losses:", "hinge"] for line in lines)
    i = lines.index("specreg-two 2.3 (entry point 'specreg_two')")
    assert lines[i + 1].strip() == "regularizers: nothing_test; losses: least_test"
    j = lines.index("specreg-broken 0.1 (entry point 'broken')")
    assert lines[j + 1].strip() == ("FAILED TO LOAD: ModuleNotFoundError: No module named "
                                    "'specreg_missing_dependency'")
    by_kind = lines[lines.index("by kind:") + 1:]
    losses = next(line for line in by_kind if line.split()[0] == "losses")
    assert "hinge" in losses and "least_test (specreg-two)" in losses
    assert "1 plugin(s) failed to load (specreg-broken)" in text

    records = {r["distribution"]: r for r in plugin_table(registry)}
    assert records["specreg-two"]["registered"] == {"regularizers": ["nothing_test"],
                                                    "losses": ["least_test"]}
    assert records["specreg-two"]["version"] == "2.3" and records["specreg-two"]["error"] is None
    assert "specreg_missing_dependency" in records["specreg-broken"]["error"]
    json.dumps(plugin_table(registry))

    assert print_plugins() == 1  # a plugin failed: the listing says so in its exit status
    assert capsys.readouterr().out.strip() == text


def test_listing_in_strict_mode_prints_the_failure_in_one_line_and_exits_2(
        plugin_path, own_registry, monkeypatch, capsys):
    write_distribution(plugin_path, "specreg-broken", "specreg_broken", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("SPECREG_STRICT_PLUGINS", "1")
    assert print_plugins() == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("specreg: error: plugin 'specreg_broken' from specreg-broken 0.1 failed "
                            "to load: RuntimeError: boom\n")


def test_listing_of_builtins_only_exits_0(own_registry, capsys):
    assert print_plugins() == 0
    out = capsys.readouterr().out
    assert "failed to load" not in out and "losses: hinge" in out


# ---------------------------------------------------------------------------------------------
# The loss-term hook in the training loop
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def orthogonal(monkeypatch):
    """The example's regularizer imported from its source folder and registered as
    "orthogonal" for the test (the slow test below installs it for real)."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    before = set(sys.modules)
    import specreg_orthogonal

    registry = get_registry()
    provider = Provider(name="specreg_orthogonal", distribution="specreg-orthogonal (source)")
    added = "orthogonal" not in registry.regularizers
    if added:
        registry.add(specreg_orthogonal, provider)
    try:
        yield specreg_orthogonal
    finally:
        if added:
            registry.remove(provider)
        # only the example's modules: dropping everything imported meanwhile (torch.distributed
        # modules that accelerate imports on first use) would register torch's operators twice
        for name in set(sys.modules) - before:
            if name.partition(".")[0] == "specreg_orthogonal":
                del sys.modules[name]


def _table(**networks) -> dict:
    return {"seed": 5, "dataset": {"name": "stacked_digits", "num_samples": 64},
            "architecture": {"name": "resnet32", "ch": 8, "g_ch": 8, "num_classes": 0},
            **{net: {"regularizer": spec} for net, spec in networks.items()},
            "train": {"iterations": 1, "batch_size": 8, "micro_batch_size": 4, "n_critic": 1,
                      "cpu": True},
            "checkpoint": {"every": 0}, "log": {"sample_every": 0, "progress": False}}


def _gradients_at_the_optimizer_steps(table: dict, run_dir: Path) -> dict:
    """{network: {parameter: (value, gradient)}} as the optimizer sees them in iteration 1."""
    recipe = structure_recipe(table)
    trainer = build_trainer(recipe, run_dir, make_accelerator(recipe))
    assert trainer.plan.accumulation == 2  # two micro-batches per step
    seen: dict = {}
    for key, opt in trainer.optimizers.items():
        model = trainer.unwrapped(trainer.models[key])

        def step(*args, _key=key, _model=model, _step=opt.step, **kwargs):
            seen[_key] = {n: (p.detach().clone(), p.grad.detach().clone())
                          for n, p in _model.named_parameters() if p.grad is not None}
            return _step(*args, **kwargs)

        opt.step = step
    trainer.train_iteration()
    seen["layers"] = {key: [n for n, _ in weight_layers(trainer.unwrapped(m))]
                      for key, m in trainer.models.items()}
    return seen


def _biggan_update(weight: torch.Tensor, strength: float) -> np.ndarray:
    """BigGAN's orthogonal-regularization gradient, strength * 2 (W W^T ⊙ (1 - I)) W (float64)."""
    w = weight.double().numpy().reshape(weight.shape[0], -1)
    return (strength * 2 * (w @ w.T * (1 - np.eye(len(w)))) @ w).reshape(weight.shape)


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_the_loop_adds_the_loss_term_to_its_networks_loss_once_per_step(
        tmp_path, orthogonal, network):
    strength = 0.5
    base = _gradients_at_the_optimizer_steps(_table(), tmp_path / "base")
    spec = {"name": "orthogonal", "strength": strength}
    run = _gradients_at_the_optimizer_steps(_table(**{network: spec}), tmp_path / "reg")
    penalized = {f"{name}.weight" for name in run["layers"][network]}
    assert penalized and len(penalized) == len(run["layers"][network])
    largest = 0.0
    for name, (value, grad) in run[network].items():
        difference = (grad.double() - base[network][name][1].double()).numpy()
        if name in penalized:  # counted once per optimizer step, whatever the 2 micro-batches
            expected = _biggan_update(value, strength)
            # the difference of two float32 sums that hold the loss gradient (up to ~40 here)
            # carries its rounding: a few units of 2**-24 of that gradient, element by element
            base_gradient = np.abs(base[network][name][1].double().numpy())
            bound = 1e-3 * np.abs(expected) + 1e-5 * np.abs(expected).max() \
                + 4 * 2.0 ** -24 * base_gradient
            excess = np.abs(difference - expected) - bound
            assert (excess <= 0).all(), \
                f"{name}: the loop's gradient differs from the loss term's by up to " \
                f"{np.abs(difference - expected).max():.3g} (bound {bound.flat[excess.argmax()]:.3g})"
            largest = max(largest, np.abs(expected).max())
        else:
            assert not difference.any(), name  # biases, BatchNorm: untouched by the penalty
    assert largest > 1e-2  # the penalty shows (a one-row weight, D's last layer, has none)
    if network == "generator":  # D's step (before G's) is exactly the run without the penalty
        for name, (_, grad) in run["discriminator"].items():
            assert torch.equal(grad, base["discriminator"][name][1]), name


# ---------------------------------------------------------------------------------------------
# The example package, installed for real
# ---------------------------------------------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("SPECREG_STRICT_PLUGINS", None)
    return env


def _run(args: list, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _site_directories() -> list[str]:
    """The site directories the running interpreter uses, in its order: this virtual environment's
    when the tests run in one (plus the base installation's if it was made with
    ``--system-site-packages``), the base installation's otherwise."""
    known = {*site.getsitepackages(), site.getusersitepackages()}
    return [entry for entry in sys.path if entry in known and Path(entry).is_dir()]


def _venv_seeing_this_environment(venv: Path) -> Path:
    """A throwaway virtual environment whose packages are its own first, then the running
    environment's; returns its python.

    ``python -m venv --system-site-packages`` is not that when the tests run in a virtual
    environment: a venv's "system" is always the *base* installation (``pyvenv.cfg``'s ``home``),
    so a nested venv would see the base interpreter's packages (on a fresh machine: no torch, no
    specreg, an old setuptools) instead of this environment's. A ``.pth`` file in the new venv's
    site-packages runs ``site.addsitedir`` on each of this environment's site directories: they
    come after the venv's own (what is installed there wins), and their ``.pth`` files are
    processed too (specreg's editable install is one).
    """
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv]))
    python = venv / "bin" / "python"
    purelib = Path(_ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]))
                   .stdout.strip())
    assert venv in purelib.parents
    lines = "; ".join(f"site.addsitedir({entry!r})" for entry in _site_directories())
    (purelib / "_running_environment.pth").write_text(f"import site; {lines}\n")
    return python


def _copy_package(source: Path, dest: Path) -> Path:
    """A clean copy (pip's build leaves build/ and *.egg-info next to the sources)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return dest


def _broken_copy(package: Path, dest: Path) -> Path:
    """The example renamed to specreg-orthogonal-broken, whose module fails at import."""
    dest = _copy_package(package, dest)
    shutil.rmtree(dest / "tests")
    src = dest / "src" / "specreg_orthogonal"
    init = src / "__init__.py"
    future = "from __future__ import annotations\n"
    assert future in init.read_text()
    init.write_text(init.read_text().replace(
        future, future + "import specreg_missing_dependency  # deliberately not installed\n", 1))
    src.rename(dest / "src" / "specreg_orthogonal_broken")
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace('name = "specreg-orthogonal"', 'name = "specreg-orthogonal-broken"')
    text = text.replace('orthogonal = "specreg_orthogonal"',
                        'orthogonal_broken = "specreg_orthogonal_broken"')
    text = text.replace("specreg_orthogonal = [", "specreg_orthogonal_broken = [")
    assert text.count("broken") == 4
    pyproject.write_text(text)
    return dest


@pytest.mark.slow
def test_example_package_installs_lists_trains_passes_the_kit_and_uninstalls(tmp_path):
    venv = tmp_path / "venv"  # throwaway: nothing is left in the test environment
    python = _venv_seeing_this_environment(venv)
    # it sees the packages of the environment running the tests (not the base interpreter's)
    seen = _ok(_run([python, "-c", "import torch, pytest; print(torch.__file__, pytest.__file__)"]))
    assert seen.stdout.split() == [torch.__file__, pytest.__file__]
    package = _copy_package(EXAMPLE, tmp_path / "specreg-orthogonal")
    # as a user installs it (``pip install PATH``: an isolated build with the setuptools its
    # pyproject.toml asks for); --no-deps: specreg and torch are this environment's
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps"]
    _ok(_run([*install, package]))

    # the package's own tests: the conformance kit (slow multi-process check included), numerics
    tests = _ok(_run([python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider",
                      "-W", "ignore::FutureWarning"], cwd=package, timeout=600))
    assert " passed" in tests.stdout and "failed" not in tests.stdout and "skipped" not in tests.stdout

    # a deliberately broken copy beside it
    _ok(_run([*install, _broken_copy(package, tmp_path / "broken")]))
    listing = _run([python, "-m", "core.run", "plugins"])
    assert listing.returncode == 1, listing.stderr  # a plugin failed to load
    out = listing.stdout
    assert ("specreg-orthogonal 0.1.0 (entry point 'orthogonal')\n"
            "  regularizers: orthogonal, r2\n") in out  # r2: the data-dependent penalty
    assert ("specreg-orthogonal-broken 0.1.0 (entry point 'orthogonal_broken')\n"
            "  FAILED TO LOAD: ModuleNotFoundError: No module named "
            "'specreg_missing_dependency'") in out
    assert "losses: hinge" in out and "orthogonal (specreg-orthogonal)" in out

    # training from the installed package's recipe works; the broken plugin only warns
    recipe = _ok(_run([python, "-c", "import specreg_orthogonal as o; print(o.recipe_path())"]))
    recipe_path = Path(recipe.stdout.strip())
    assert venv in recipe_path.parents  # shipped inside the installed package
    run_dir = tmp_path / "run"
    overrides = ["dataset.num_samples=256", "architecture.ch=8", "architecture.g_ch=8",
                 "train.iterations=2", "train.batch_size=8", "train.n_critic=1", "train.cpu=true",
                 "log.progress=false", "log.sample_every=0", "checkpoint.every=0",
                 "eval.metrics=[]", "eval.best=''"]
    train = _ok(_run([python, "-m", "core.run", recipe_path, "--run-dir", run_dir,
                      *[x for kv in overrides for x in ("--set", kv)]], timeout=600))
    assert "plugin 'orthogonal_broken' from specreg-orthogonal-broken" in train.stderr
    assert (run_dir / "checkpoints" / "iter_0000002" / "state.json").is_file()
    used = json.loads((run_dir / "plugins.json").read_text())["plugins"]
    assert used["regularizers/orthogonal"]["distribution"] == "specreg-orthogonal"
    assert used["regularizers/orthogonal"]["version"] == "0.1.0"
    assert used["regularizers/sn"]["distribution"] == "specreg (built-in)"

    # uninstalled: gone from the listing, which exits 0 again
    _ok(_run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "specreg-orthogonal",
              "specreg-orthogonal-broken"]))
    listing = _ok(_run([python, "-m", "core.run", "plugins"]))
    assert "orthogonal" not in listing.stdout and "losses: hinge" in listing.stdout
