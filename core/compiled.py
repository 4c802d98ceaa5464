"""``train.compile`` and ``train.channels_last``: the same networks, run faster where it pays.

Both change how a network computes, never what: ``torch.compile`` traces the forward (and AOT
autograd the backward) into fused kernels, the channels-last memory format (NHWC) lets
convolutions use the layouts tensor cores prefer. Parameters stay the same ``nn.Parameter``
objects and state-dict keys stay the eager ones, so optimizers, checkpoints, resume, DDP and the
regularizers' parametrizations (``torch.nn.utils.parametrize``) see the networks they always saw.

- :func:`to_channels_last` converts a network's 4-d parameters and buffers in place.
- :func:`compile_in_place` compiles a network with ``nn.Module.compile`` (in place: no
  ``_orig_mod`` wrapper, unlike ``torch.compile(module)``). A graph that fails to compile runs
  eagerly with a warning (``torch._dynamo.config.suppress_errors``): a slow run, never a crash.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from core.errors import SpecregError

__all__ = ["to_channels_last", "compile_in_place", "check_backend"]


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` with its 4-d tensors (conv weights) in the channels-last format, in place."""
    return module.to(memory_format=torch.channels_last)


def check_backend(backend: str) -> None:
    """Raise a :class:`SpecregError` naming ``train.compile_backend`` when torch has no such
    backend."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise SpecregError(f"train.compile_backend: torch.compile has no backend {backend!r}; "
                           f"valid: {', '.join(sorted(known))}")


def _falling_back(backend: str):
    """A ``torch.compile`` backend that runs ``backend`` and, where it raises, warns and runs the
    traced graph eagerly."""
    from torch._dynamo import lookup_backend

    compiler = lookup_backend(backend)

    def compile_graph(graph: torch.fx.GraphModule, example_inputs):
        try:
            return compiler(graph, example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure of the compiler: run eagerly
            warnings.warn(f"torch.compile ({backend}) failed on a graph, which runs eagerly: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          RuntimeWarning, stacklevel=2)
            return graph.forward

    return compile_graph


def compile_in_place(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``module`` compiled in place with ``backend``; a graph the backend cannot compile runs
    eagerly with a warning, as does one dynamo cannot trace (``suppress_errors``, logged)."""
    import torch._dynamo

    check_backend(backend)
    config = torch._dynamo.config
    config.suppress_errors = True
    # one graph per combination the loop runs (train/eval, frozen regularizer state, D frozen in
    # the G step, the last micro-batch): more than dynamo's default of 8 per function
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, limit):
            setattr(config, limit, max(getattr(config, limit), 64))
    module.compile(backend=_falling_back(backend))
    return module
