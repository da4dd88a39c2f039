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
  first layer is an MLP generates (tests/model/families/test_nemotron.py) fails if the mend stops working.
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
    if dummy is None or not _stateless_layer_zero_breaks(cache_utils):
        return False  # no stateless cache layers, or the cache already looks past them (5.24 and older)
    original = cache_utils.Cache.get_seq_length

    @functools.wraps(original)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        layers = getattr(self, "layers", [])
        if layer_idx < len(layers) and isinstance(layers[layer_idx], dummy):
            stateful = next((layer for layer in layers if not isinstance(layer, dummy)), None)
            return 0 if stateful is None else stateful.get_seq_length()  # nothing cached anywhere: 0
        return original(self, layer_idx)

    cache_utils.Cache.get_seq_length = get_seq_length
    return True


def _stateless_layer_zero_breaks(cache_utils) -> bool:
    """Whether `get_seq_length()` of a cache whose layer 0 holds nothing raises, as on 5.25 (probed, not
    read off the version: a later release may fix it)."""
    try:
        cache = cache_utils.DynamicCache()
        cache.layers = [cache_utils.DummyLayer(), cache_utils.DynamicLayer()]
    except Exception:  # another cache API: nothing this mend knows how to mend
        return False
    try:
        cache.get_seq_length()
    except AttributeError:
        return True
    except Exception:
        return False
    return False
