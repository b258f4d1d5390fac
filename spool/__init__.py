"""spool: a durable store-and-forward agent for StatHat."""

from spool.api import Spool
from spool.errors import (
    ConfigError,
    EndpointError,
    InvalidRecord,
    Refused,
    ShipError,
    SpoolError,
    StoreError,
    TransientError,
)
from spool.records import Record

__all__ = [
    "ConfigError",
    "EndpointError",
    "InvalidRecord",
    "Record",
    "Refused",
    "ShipError",
    "Spool",
    "SpoolError",
    "StoreError",
    "TransientError",
]
__version__ = "0.1.0"
