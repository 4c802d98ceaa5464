"""The whole plugin API: six hooks, each handed a ``register(name, cls)`` callback.

A plugin module (built-in or from a third-party package's ``specreg`` entry point) implements
any of them::

    from core.hookspecs import hookimpl

    @hookimpl
    def register_regularizers(register):
        register("orthogonal", OrthogonalRegularizer)
"""

from __future__ import annotations

from typing import Callable

import pluggy

#: the project name: pluggy markers and the entry-point group.
PROJECT = "specreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, type], None]


@hookspec
def register_regularizers(register: Register) -> None:
    """Register :class:`core.interfaces.Regularizer` subclasses: ``register("sn", SpectralNorm)``."""


@hookspec
def register_architectures(register: Register) -> None:
    """Register :class:`core.interfaces.Architecture` subclasses (generator + discriminator)."""


@hookspec
def register_losses(register: Register) -> None:
    """Register :class:`core.interfaces.Loss` subclasses."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register :class:`core.interfaces.Metric` subclasses."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register :class:`core.interfaces.Dataset` subclasses."""


@hookspec
def register_callbacks(register: Register) -> None:
    """Register :class:`core.interfaces.Callback` subclasses (training-loop hooks), selected by
    ``[callbacks.NAME]`` recipe tables: ``register("spectral", SpectralMonitor)``."""
