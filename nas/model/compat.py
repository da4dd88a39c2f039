"""Mends for transformers releases inside nas's supported range that break a supported family.

Each mend detects the break by feature, not by version number, so it stays off on releases that do not have
the break (older or fixed ones); `apply()` is idempotent and runs when `nas.model.families` is imported.

- **A cache whose layer 0 holds nothing** (transformers 5.25, issue 30). `DynamicCache(config=...)` gives the
  layers that keep no state (Nemotron-H's `mlp` and `moe` blocks) a `DummyLayer` without `get_seq_length`,
  and `Cache.get_seq_length()` asks layer 0. So a Nemotron-H forward with the default cache, and every
  `generate()`, fails when the first layer is an MLP or MoE block, which depth pruning makes (it drops the
  least important Mamba layer, the first one included). The mend asks the first layer that holds a state
  instead: every layer of a cache has seen the same tokens, so that is the sequence length transformers
  means. Written here because no transformers release has the fix yet; the test that a pruned stack whose
  first layer is an MLP generates (tests/test_nemotron.py) fails if the mend stops working.
"""

from __future__ import annotations

import functools


def apply() -> None:
    """Apply every mend the installed transformers needs (nothing on releases without the breaks)."""
    _mend_dummy_layer_seq_length()


@functools.cache
def _mend_dummy_layer_seq_length() -> bool:
    from transformers import cache_utils

    dummy = getattr(cache_utils, "DummyLayer", None)
    if dummy is None or hasattr(dummy, "get_seq_length"):
        return False  # no stateless cache layers, or they answer themselves
    original = cache_utils.Cache.get_seq_length

    @functools.wraps(original)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        layers = getattr(self, "layers", [])
        if layer_idx < len(layers) and isinstance(layers[layer_idx], dummy):
            stateful = [i for i, layer in enumerate(layers) if not isinstance(layer, dummy)]
            if not stateful:
                return 0  # nothing is cached anywhere
            layer_idx = stateful[0]
        return original(self, layer_idx)

    cache_utils.Cache.get_seq_length = get_seq_length
    return True
