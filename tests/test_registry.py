"""The plugin registry: built-ins, entry points from installed distributions, failures, duplicates."""

from __future__ import annotations

import pytest

from conftest import write_distribution
from core.interfaces import PLUGIN_KINDS
from core.registry import (DuplicatePluginError, PluginError, Provider, Registry,
                           UnknownPluginError, get_registry)

GOOD_PLUGIN = '''
import attrs
from core.hookspecs import hookimpl
from core.interfaces import Loss

class Wasserstein(Loss):
    @attrs.define
    class Config:
        pass
    def discriminator_loss(self, real, fake):
        return fake.mean() - real.mean()
    def generator_loss(self, fake):
        return -fake.mean()

@hookimpl
def register_losses(register):
    register("wasserstein_test", Wasserstein)
'''


def fresh_registry() -> Registry:
    registry = Registry()
    registry.load_builtins()
    registry.load_entry_points()
    return registry


def test_builtins_are_registered_with_their_base_class():
    registry = get_registry()
    assert "hinge" in registry.losses
    assert "stacked_digits" in registry.datasets
    for kind, base in PLUGIN_KINDS.items():
        for name, cls in registry.kinds[kind].items():
            assert issubclass(cls, base)
            assert "name" not in vars(cls)  # the registry never writes onto the class
            assert registry.create(kind, name).name == name
            cls.Config()  # every Config is default-constructible


def test_entry_point_of_an_installed_distribution_is_loaded(plugin_path):
    write_distribution(plugin_path, "specreg-wasserstein", "specreg_wasserstein", GOOD_PLUGIN)
    registry = fresh_registry()
    cls = registry.losses["wasserstein_test"]
    provider = registry.losses.providers["wasserstein_test"]
    assert provider.distribution == "specreg-wasserstein" and provider.version == "0.1"
    import torch
    assert cls().discriminator_loss(torch.ones(3), torch.zeros(3)).item() == -1.0


def test_broken_entry_point_warns_and_the_rest_keep_working(plugin_path, capsys, monkeypatch):
    write_distribution(plugin_path, "specreg-broken", "specreg_broken", "import not_a_module_xyz\n")
    write_distribution(plugin_path, "specreg-wasserstein", "specreg_wasserstein", GOOD_PLUGIN)
    monkeypatch.delenv("SPECREG_STRICT_PLUGINS", raising=False)
    registry = fresh_registry()
    err = capsys.readouterr().err
    assert "specreg-broken" in err and "not_a_module_xyz" in err
    assert "wasserstein_test" in registry.losses and "hinge" in registry.losses
    failed = [p for p in registry.providers if p.error]
    assert [p.distribution for p in failed] == ["specreg-broken"]


def test_strict_mode_makes_a_broken_plugin_an_error(plugin_path, monkeypatch):
    write_distribution(plugin_path, "specreg-broken", "specreg_broken", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("SPECREG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="specreg-broken.*boom"):
        fresh_registry()


def test_duplicate_name_is_refused_naming_both_providers(plugin_path, monkeypatch):
    monkeypatch.setenv("SPECREG_STRICT_PLUGINS", "1")  # otherwise a warning (test_run_hardening)
    write_distribution(plugin_path, "specreg-dup", "specreg_dup",
                       GOOD_PLUGIN.replace('"wasserstein_test"', '"hinge"'))
    with pytest.raises(DuplicatePluginError) as info:
        fresh_registry()
    message = str(info.value)
    assert "'hinge'" in message and "plugins.losses.hinge" in message and "specreg-dup" in message


def test_registering_a_class_of_the_wrong_kind_is_refused(plugin_path):
    write_distribution(plugin_path, "specreg-wrong", "specreg_wrong",
                       GOOD_PLUGIN.replace("def register_losses", "def register_metrics"))
    registry = fresh_registry()  # not strict: warned and skipped
    assert "wasserstein_test" not in registry.metrics
    (failed,) = [p for p in registry.providers if p.error]
    assert "not a subclass" in failed.error


def test_misspelled_hook_is_caught(plugin_path):
    source = GOOD_PLUGIN.replace("def register_losses", "def register_loses")
    write_distribution(plugin_path, "specreg-typo", "specreg_typo", source)
    registry = fresh_registry()
    (failed,) = [p for p in registry.providers if p.error]
    assert "register_loses" in failed.error


def test_unknown_name_lists_installed_and_nearest_match():
    with pytest.raises(UnknownPluginError) as info:
        get_registry().losses["hingee"]
    message = str(info.value)
    assert "unknown loss 'hingee'" in message
    assert "did you mean 'hinge'" in message
    assert "installed: " in message


ALIASED_PLUGIN = GOOD_PLUGIN.replace(
    'register("wasserstein_test", Wasserstein)',
    'register("wasserstein_test", Wasserstein)\n    register("wgan_alias_test", Wasserstein)')


def test_one_class_under_two_names_gives_instances_reporting_each(plugin_path):
    write_distribution(plugin_path, "specreg-alias", "specreg_alias", ALIASED_PLUGIN)
    registry = fresh_registry()
    cls = registry.losses["wasserstein_test"]
    assert registry.losses["wgan_alias_test"] is cls
    snapshot = dict(vars(cls))
    assert registry.create("losses", "wasserstein_test").name == "wasserstein_test"
    assert registry.create("losses", "wgan_alias_test").name == "wgan_alias_test"
    assert "name" not in vars(cls) and dict(vars(cls)) == snapshot  # the class is untouched
    assert registry.name_of(cls) == "wasserstein_test"  # the first name it was registered under
    assert cls().name == "wasserstein_test"  # made directly: its class's first registered name
    assert cls(name="mine").name == "mine"


def test_an_unregistered_subclass_reports_its_own_name_not_its_base_s():
    registry = get_registry()
    sn = registry.regularizers["sn"]

    class MySpectralNorm(sn):
        pass

    assert sn().name == "sn"
    assert MySpectralNorm().name == "MySpectralNorm"
    assert registry.name_of(MySpectralNorm) is None
    assert "name" not in vars(MySpectralNorm) and "name" not in vars(sn)


def test_registering_leaves_the_class_dict_unchanged_and_removal_forgets_the_name():
    from core.hookspecs import hookimpl
    from core.interfaces import Loss

    class Plain(Loss):
        pass

    before = dict(vars(Plain))
    registry = Registry()

    @hookimpl
    def register_losses(register):
        register("plain_test", Plain)

    plugin = type("PlainPlugin", (), {"register_losses": staticmethod(register_losses)})()
    provider = Provider(name="test", distribution="test")
    registry.add(plugin, provider)
    assert dict(vars(Plain)) == before
    assert registry.create("losses", "plain_test").name == "plain_test" == Plain().name
    registry.remove(provider)
    assert dict(vars(Plain)) == before
    assert Plain().name == "Plain"


def test_create_names_a_plugin_whose_init_takes_only_a_config(plugin_path):
    source = GOOD_PLUGIN.replace("    def discriminator_loss", """    def __init__(self, config=None):
        super().__init__(config)
    def discriminator_loss""")
    write_distribution(plugin_path, "specreg-oldinit", "specreg_oldinit", source)
    registry = fresh_registry()
    assert registry.create("losses", "wasserstein_test").name == "wasserstein_test"



CALLBACK_PLUGIN = '''
import attrs
from core.hookspecs import hookimpl
from core.interfaces import Callback

class Heartbeat(Callback):
    @attrs.define
    class Config:
        every: int = 10

@hookimpl
def register_callbacks(register):
    register("heartbeat_test", Heartbeat)
'''


def test_callbacks_are_a_plugin_kind_with_the_spectral_monitor_built_in():
    from core import hookspecs
    from core.interfaces import Callback

    assert PLUGIN_KINDS["callbacks"] is Callback
    assert callable(getattr(hookspecs, "register_callbacks"))
    registry = get_registry()
    assert registry.callbacks.providers["spectral"].name == "plugins.callbacks.spectral_monitor"
    monitor = registry.create("callbacks", "spectral")
    assert isinstance(monitor, Callback) and monitor.name == "spectral"
    assert registry.callbacks["spectral"].default_enabled and not Callback.default_enabled
    with pytest.raises(UnknownPluginError, match="unknown callback 'spectrl' "
                                                 r"\(did you mean 'spectral'\?\)"):
        registry.callbacks["spectrl"]


def test_a_callback_from_an_installed_distribution_is_loaded_and_checked(plugin_path):
    write_distribution(plugin_path, "specreg-heartbeat", "specreg_heartbeat", CALLBACK_PLUGIN)
    registry = fresh_registry()
    assert registry.callbacks.providers["heartbeat_test"].distribution == "specreg-heartbeat"
    assert registry.create("callbacks", "heartbeat_test").config.every == 10
    write_distribution(plugin_path, "specreg-notacallback", "specreg_notacallback",
                       GOOD_PLUGIN.replace("def register_losses", "def register_callbacks"))
    registry = fresh_registry()  # a Loss registered as a callback: warned and skipped
    assert "wasserstein_test" not in registry.callbacks
    (failed,) = [p for p in registry.providers if p.error]
    assert "not a subclass of core.interfaces.Callback" in failed.error
