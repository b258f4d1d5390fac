"""spool: a durable store-and-forward agent for StatHat.

    from spool import Spool

Names are loaded on first use (PEP 562), so `spool add` pays only for the modules it needs.
"""

from __future__ import annotations

# Not even typing at run time: the `spool` command imports this package before it pauses the garbage collector
# for the CLI's imports (spool/__main__.py), and typing is a large module the CLI imports anyway.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Spool": "spool.api",
    "Record": "spool.records",
    "ConfigError": "spool.errors",
    "EndpointError": "spool.errors",
    "InvalidRecord": "spool.errors",
    "PartlyTaken": "spool.errors",
    "Refused": "spool.errors",
    "ShipError": "spool.errors",
    "SpoolError": "spool.errors",
    "StoreError": "spool.errors",
    "TransientError": "spool.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spool' has no attribute {name!r}")
