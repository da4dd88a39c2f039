"""nas: find the best small language model inside a big one (Minitron pruning + distillation search)."""

from nas.arch import Arch, count_params, kv_cache_bytes
from nas.errors import ConfigError, DataError, InfeasibleError, ModelError, NasError

__all__ = [
    "Arch",
    "ConfigError",
    "DataError",
    "InfeasibleError",
    "ModelError",
    "NasError",
    "count_params",
    "kv_cache_bytes",
]
__version__ = "0.1.0"
