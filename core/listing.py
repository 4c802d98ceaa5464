"""``specreg plugins`` / ``python -m core.run --list-plugins``: what is installed, from where.

Every distribution that provides plugins (specreg's built-in modules first, then each installed
package with a ``specreg`` entry point), its version, the names it registered per kind, and every
entry point that failed to load with the reason; then all names by kind. The exit status is 1 when
a plugin failed to load (the others still work), 2 when one failed in strict mode
(``SPECREG_STRICT_PLUGINS=1``), else 0::

    specreg 0.1.0 (built-in)
      plugins.losses.hinge                losses: hinge
      ...
    specreg-orthogonal 0.1.0 (entry point 'orthogonal')
      regularizers: orthogonal
    specreg-broken 0.1.0 (entry point 'broken')
      FAILED TO LOAD: ModuleNotFoundError: No module named 'not_a_module'

:func:`plugin_table` gives the same as JSON-ready records.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from core.interfaces import PLUGIN_KINDS
from core.registry import STRICT_ENV, PluginError, Provider, Registry, get_registry

BUILTIN = "specreg (built-in)"


def _names(provider: Provider) -> str:
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in provider.registered.items()
                     if names) or "(registered nothing)"


def plugin_table(registry: Registry) -> list[dict[str, Any]]:
    """One record per provider: distribution, version, entry point or module, names per kind,
    and the load error (None when it loaded)."""
    return [{"distribution": "specreg" if p.distribution == BUILTIN else p.distribution,
             "builtin": p.distribution == BUILTIN,
             "version": p.version,
             "source": p.name,
             "registered": {kind: list(names) for kind, names in p.registered.items() if names},
             "error": p.error}
            for p in registry.providers]


def format_plugins(registry: Registry) -> str:
    builtins = [p for p in registry.providers if p.distribution == BUILTIN]
    others = [p for p in registry.providers if p.distribution != BUILTIN]
    lines: list[str] = []
    if builtins:
        version = next((p.version for p in builtins if p.version), "")
        lines.append(f"specreg {version} (built-in)".replace("  ", " "))
        width = max(len(p.name) for p in builtins)
        lines += [f"  {p.name.ljust(width)}  {_names(p)}" for p in builtins]
    for p in others:
        version = f" {p.version}" if p.version else ""
        lines.append(f"{p.distribution}{version} (entry point '{p.name}')")
        lines.append(f"  FAILED TO LOAD: {p.error}" if p.error else f"  {_names(p)}")
    lines += ["", "by kind:"]
    width = max(len(kind) for kind in PLUGIN_KINDS)
    for kind in PLUGIN_KINDS:
        table = registry.kinds[kind]
        names = []
        for name in table:
            provider = table.providers[name]
            names.append(name if provider.distribution == BUILTIN
                          else f"{name} ({provider.distribution})")
        lines.append(f"  {kind.ljust(width)}  {', '.join(names) or '-'}")
    failed = [p for p in registry.providers if p.error]
    if failed:
        which = ", ".join(p.distribution for p in failed)
        lines += ["", f"{len(failed)} plugin(s) failed to load ({which}) and were skipped; "
                      f"everything else works. Set {STRICT_ENV}=1 to make this an error."]
    return "\n".join(lines)


def print_plugins(file: TextIO | None = None) -> int:
    """Print the listing; 1 if a plugin failed to load, else 0. In strict mode
    (``SPECREG_STRICT_PLUGINS=1``) a plugin that fails prints one line and returns 2."""
    try:
        registry = get_registry()
    except PluginError as exc:
        print(f"specreg: error: {exc}", file=sys.stderr)
        return 2
    print(format_plugins(registry), file=file or sys.stdout)
    return 1 if any(p.error for p in registry.providers) else 0
