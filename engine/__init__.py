"""mlxsup.engine: the process that owns the MLX model, batches, generates, scores and swaps
adapters. The in-process API is `Engine` (see docs/engine.md); `python -m mlxsup.engine`
runs it as the supervisor's child on the shared-memory IPC."""

from .adapter_files import AdapterError
from .adapters import PreparedAdapter
from .config import EngineConfig
from .core import Engine, RequestError, SwapTicket
from .scheduler import QueueFull

__all__ = [
    "AdapterError",
    "Engine",
    "EngineConfig",
    "PreparedAdapter",
    "QueueFull",
    "RequestError",
    "SwapTicket",
]
