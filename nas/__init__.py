"""nas: find the best small language model inside a big one (Minitron pruning + distillation search).

The front door: `nas.compute_importance`, `nas.enumerate_candidates`, `nas.prune`, `nas.distill`,
`nas.run` (the whole pipeline from a `RunConfig`, see `nas.load_run_config`), `nas.write_report`.
Heavy modules load on first use, so `import nas` stays cheap.
"""

import importlib

from nas.errors import ConfigError, DataError, InfeasibleError, ModelError, NasError
from nas.model.arch import Arch
from nas.model.size import count_params, kv_cache_bytes

_LAZY = {
    "compute_importance": "nas.prune.importance",
    "Importance": "nas.prune.importance",
    "enumerate_candidates": "nas.prune.space",
    "prune": "nas.prune.cut",
    "save_pruned": "nas.prune.cut",
    "distill": "nas.train.loop",
    "DistillConfig": "nas.settings",
    "prepare": "nas.data.tokens",
    "DataConfig": "nas.settings",
    "RunConfig": "nas.settings",
    "load_run_config": "nas.settings",
    "run": "nas.pipeline",
    "search": "nas.pipeline",
    "worker": "nas.pipeline",
    "write_report": "nas.report.html",
    "lm_loss": "nas.evaluate.loss",
}

__all__ = [
    "Arch",
    "ConfigError",
    "DataError",
    "InfeasibleError",
    "ModelError",
    "NasError",
    "count_params",
    "kv_cache_bytes",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nas' has no attribute {name!r}")
