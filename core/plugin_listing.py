"""``specreg plugins`` / ``python -m core.run --list-plugins``: what is installed, from where.

Every provider (built-in module or installed distribution) with its version and the names it
registered per kind, and every entry point that failed to load with the reason.
"""

from __future__ import annotations

import sys

from core.plugins import Registry, get_registry


def format_plugins(registry: Registry) -> str:
    lines = []
    for provider in registry.providers:
        version = f" {provider.version}" if provider.version else ""
        head = f"{provider.distribution}{version}  [{provider.name}]"
        if provider.error:
            lines.append(f"{head}\n    FAILED TO LOAD: {provider.error}")
            continue
        names = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in provider.registered.items())
        lines.append(f"{head}\n    {names or '(registered nothing)'}")
    return "\n".join(lines)


def print_plugins(file=sys.stdout) -> int:
    registry = get_registry()
    print(format_plugins(registry), file=file)
    return 1 if any(p.error for p in registry.providers) else 0
