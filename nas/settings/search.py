"""What to search: the [space], [importance], [search] and [constraints] tables."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from nas.settings.base import (
    BUDGET_KINDS,
    DTYPE_BYTES,
    PRUNERS,
    SIZE_KNOBS,
    STRATEGIES,
    Settings,
    _described,
)

MIN_HORIZON_FACTOR = 4  # the adaptive horizon's default floor, in horizons (see min_horizon_factor)

class SpaceConfig(Settings):
    """Which architectures are valid candidates (besides the budget)."""

    tolerance: float = _described(
        0.05, "candidates have budget*(1-tolerance) <= params <= budget", ge=0, lt=1
    )
    max_width_prune: float = _described(0.5, "at most this fraction of any width knob is cut", ge=0, lt=1)
    max_depth_prune: float = _described(0.5, "at most this fraction of the layers is cut", ge=0, lt=1)
    steps: dict[Literal[SIZE_KNOBS], Annotated[int, Field(ge=1)]] = _described(  # type: ignore[valid-type]
        {},
        "per-knob step of the sizes (num_layers, hidden_size, ffn_hidden_size, num_query_groups, "
        "num_experts; hybrids: num_<type>_layers, num_linear_key_heads, num_mamba_heads, mamba_head_dim); "
        "missing knobs get hardware-friendly defaults; a hybrid whose attention is at most 1 layer in 10 keeps "
        "its attention heads and KV groups unless num_query_groups is given",
    )
    budget_kind: Literal[BUDGET_KINDS] = _described(  # type: ignore[valid-type]
        "total", "what the budget counts: all parameters, or those active per token (mixture of experts)"
    )


class ImportanceConfig(Settings):
    """The importance pass (Minitron: activations on ~1024 calibration sequences, no gradients)."""

    num_samples: int = _described(1024, "calibration sequences", ge=1)
    val_sequences: int = _described(64, "held-out sequences for the loss with each layer removed", ge=1)
    batch_size: int = _described(8, "sequences per forward of the importance pass", ge=1)


class SearchConfig(Settings):
    """The Optuna study: one trial = one candidate, pruned and distilled for a short horizon."""

    horizon_tokens: int = _described(
        0,
        "KD tokens per candidate (the first rung of the adaptive horizon); 0: horizon_tokens_per_param x "
        "the largest budget's parameters. Steps are tokens / (batch_size x grad_accum x seq_len)",
        ge=0,
    )
    # Minitron (arXiv 2407.14679 §4): "1.8 billion tokens (400 steps)" per candidate of ~8B parameters,
    # i.e. 0.225 tokens a parameter; kept per parameter at any size because compute-optimal tokens grow
    # linearly with parameters (Chinchilla, arXiv 2203.15556 §3): an 0.8B student gets 0.18B tokens.
    horizon_tokens_per_param: float = _described(
        0.225, "horizon_tokens = 0: tokens per parameter of the budget (Minitron: 1.8B tokens at 8B)", gt=0
    )
    rung_tokens: int = _described(
        0,
        "KD tokens between validations, the halving's rungs (0: horizon / 8, Minitron's 50 of 400 steps)",
        ge=0,
    )
    adaptive: bool = _described(
        True,
        "after the horizon, the finalists keep distilling in rungs of doubling tokens until the order of "
        "the best `stable_top` agrees between consecutive rungs, or max_horizon_factor x horizon is spent",
    )
    # the measurements: tau vs a 10x ground truth 0.72 at the horizon, 0.85 at 4x, 0.93 at 8x
    max_horizon_factor: int = _described(
        8, "adaptive horizon: tokens per finalist at most this many horizons (the cap)", ge=1
    )
    # measured here (benchmarks/search_quality.py, 30% and 40%): the best three kept their order from half to
    # the full horizon in both budgets, yet their Kendall tau vs a 10x ground truth was -0.33 and 0.33; the
    # half-horizon rung is the trials' own, and cannot see a ranking still moving at a longer scale. The default
    # floor is MIN_HORIZON_FACTOR (4): over 4 teachers and 9 budgets (commits 7bb4389-295fb68, brute force, reads
    # on 32 sequences) the candidate best at 2x was the ground truth's best, or within 0.004 nats of it, in 8, but
    # on the MoE teacher at 45% a 4-layer candidate led at 1x and 2x (regret 0.0161) and the deeper ones passed it
    # by 4x (0.0026). With reads on 128 sequences (commit 05b86dc, 10 budgets) the best at 2x was within 0.008
    # nats everywhere, and nas at this floor picked the ground truth's best in all 10 (benchmarks/README.md)
    min_horizon_factor: int | None = _described(
        None,
        "adaptive horizon: the order must hold from the horizon to at least this many horizons before it "
        "counts as stable (1: the trials' own half vs full horizon may decide; unset: 4, or max_horizon_factor "
        "when that is lower). A horizon already stopped stays stopped",
        ge=1,
    )
    stable_top: int = _described(
        3, "adaptive horizon: how many of the best candidates must keep their order", ge=2
    )
    stable_tau: float = _described(
        1.0,
        "adaptive horizon: Kendall tau between consecutive rungs (over the best stable_top; swaps within "
        "the validation noise count as ties) at or above which the order holds",
        ge=-1,
        le=1,
    )
    # measured here (benchmarks/search_quality.py, 30%, 26 candidates): the best three kept their order from
    # half to the full horizon, yet their Kendall tau vs a 10x ground truth was -0.33; their power laws
    # predicted the crossing. A horizon already stopped stays stopped (not part of the study's identity).
    predict_crossings: bool = _described(
        True,
        "adaptive horizon: the order holds only if it is also the order that the finalists' power laws "
        "(fitted to their curves) predict at the final distillation's tokens: curves that will cross keep "
        "distilling",
    )
    extrapolate: bool = _described(
        False,
        "adaptive horizon: rank by each curve's power law in tokens fitted to predict the loss at the "
        "final distillation's tokens, not by the observed loss",
    )
    # measured here (benchmarks/search_quality.py, 25/30/40/45% --brute-factor 4, commit fae8e16; README):
    # Kendall tau of every candidate vs a 10x ground truth on the same schedule, mean over the budgets at
    # 1x/2x/4x the horizon: restart 0.82/0.92/0.82, wsd 0.45/0.73/0.77; restart's pick had regret 0 in all
    # four, wsd's 0.0153 at 25%. On four teachers (Llama deep and wide, Nemotron-H, Qwen3-MoE; 10 budgets, commit
    # 05b86dc's floor and reads) both picked the ground truth's best in all 10, the tau over resolved pairs dipped
    # in 2 of 10 either way, and wsd spent 1.3-2.6x the tokens. With the ground truth on 2 seeds and reads on 1,024
    # sequences (commit d83cc1f): restart's resolved tau never fell from one rung to the next in all 10 budgets;
    # on 5 of them wsd fell at hybrid 25% (0.86 / 0.66 / 0.93), picked worse in 3 (by 0.0008-0.0027; better in
    # 1 by 0.0001) and spent more tokens in 4. Restart stays the default
    rung_schedule: Literal["restart", "wsd"] = _described(
        "restart",
        "how trials and the adaptive horizon's rungs train and are read (nas.search.wsd): wsd = constant LR "
        "after the warmup, each rung read after a short decay branch that is thrown away, the next rung and the "
        "winner's final distillation continuing the stable phase with its optimizer state (the final one ends "
        "with the decay); restart = each rung and the final distillation a fresh schedule from the last weights",
    )
    bootstrap_samples: int = _described(
        1000, "resamples of the validation sequences that measure the noise of the top-1 margin", ge=10
    )
    # measured here (benchmarks/search_quality.py, 25/30/40/45%): the funnel with 1 of each class picked as
    # well as the halving over every candidate (the same picks) at 0.71-0.92x its tokens, and its finalists'
    # order matched the 10x ground truth in 3 of 4 budgets (the halving over all: 2 of 4; over the pairs the
    # ground truth resolves, both 3 of 3)
    per_class: int = _described(
        1,
        "the screen keeps besides its best screen_top the best per_class of each depth (num_layers) and of "
        "each class (the unit kinds it cuts: depth, hidden, mlp, attention, experts, recurrent), and the "
        "halving never stops the first of a class, so no class is dropped before the horizon",
        ge=0,
    )
    # the 5-candidate space (benchmarks/search_quality.py): the funnel spent 0.6x of brute force's tokens
    # and picked worse than the zero-shot score. Stopping such a space at the horizon (commit fae8e16) picked
    # the ground truth's best on the deep teacher (25%, 30%) but not on the MoE teacher at 45% (regret 0.0161,
    # 5 candidates, commit c77bd4e: a 4-layer candidate led at 1x and 2x, the deeper ones passed it by 4x), so
    # the adaptive horizon goes on from the whole space's rung 0. Not part of the study's identity
    small_space: bool = _described(
        True,
        "a budget whose whole space is no larger than screen_top: every candidate runs to the horizon with no "
        "halving, and the adaptive horizon goes on from all of them",
    )
    pruner: Literal[PRUNERS] = _described("successive-halving", "how losing trials are stopped early")  # type: ignore[valid-type]
    reduction_factor: int = _described(3, "keep the best 1/reduction_factor of the trials at each rung", ge=2)
    strategy: Literal[STRATEGIES] = _described(  # type: ignore[valid-type]
        "auto",
        "which candidates are distilled, in what order (nas.search.strategy): auto/funnel: screen every "
        "candidate, short-KD each budget's best screen_top; exhaustive: every candidate, best screen first; "
        "tpe: sample one budget's space (older studies: search.sampler)",
    )
    screen_sequences: int = _described(
        8, "validation sequences of the screen (every candidate's loss right after pruning)", ge=1
    )
    screen_top: int = _described(
        8, "funnel: candidates per budget, best screen first, that get short KD", ge=1
    )
    finalists: int = _described(
        3, "candidates per budget never stopped before the horizon (the first ones, best screen first)", ge=1
    )
    rerank_tasks: list[str] = _described(
        [], "lm-eval tasks (e.g. kjv_lastword) scored on the completed trials, shown beside the loss"
    )
    rerank_limit: int = _described(0, "items per re-rank task (0: all)", ge=0)
    n_trials: int = _described(
        0, "finished trials wanted; 0: every candidate (exhaustive) or 20 (sampled)", ge=0
    )
    order: Literal["pruned-loss", "params"] = _described(
        "pruned-loss", "exhaustive order: best zero-shot loss first (pruned-loss) or largest first (params)"
    )
    top_k: int = _described(
        5, "trials re-ranked at half vs full horizon; their short-run models are kept", ge=1
    )
    storage: str = _described("", "Optuna storage URL (default sqlite:///<out_dir>/study.db)")
    latency_tokens: int = _described(128, "sequence length of the latency measurement", ge=1)
    heartbeat_interval: int = _described(30, "seconds between a running trial's heartbeats", ge=1)
    grace_period: int = _described(120, "seconds of silence after which a trial is failed and retried", ge=1)
    max_retry: int = _described(2, "retries of a failed candidate before it is given up", ge=0)
    teacher_cache: bool = _described(
        False,
        "trials train from a per-study cache of the teacher's top-k outputs on the horizon's batches, "
        "written once before the trials; the teacher is not resident on the GPU during trials",
    )
    teacher_cache_topk: int = _described(
        64,
        "teacher tokens kept per position in the teacher cache (the rest as one bucket; >= vocab: exact)",
        ge=1,
    )

    @model_validator(mode="before")
    @classmethod
    def _older_sampler(cls, data: Any) -> Any:
        """`sampler`, the setting's name before it was named for what it picks (older TOMLs and studies)."""
        if isinstance(data, dict) and "sampler" in data:
            if "strategy" in data:
                raise ValueError("give search.strategy or (older studies) search.sampler, not both")
            data = {k if k != "sampler" else "strategy": v for k, v in data.items()}
        return data


class ConstraintsConfig(Settings):
    """Deployment limits besides the parameter budget; a candidate outside any is never trained."""

    max_memory: str = _described(
        "", "weights + KV cache limit in bytes: 2GB, 512MB, 2GiB, 3.5e9, or a share of the teacher's (60%)"
    )
    seq_len: int = _described(4096, "KV-cache tokens per sequence counted in the memory", ge=1)
    batch: int = _described(1, "sequences whose KV cache counts in the memory", ge=1)
    dtype: Literal[tuple(DTYPE_BYTES)] = _described(  # type: ignore[valid-type]
        "bfloat16", "dtype of the weights and the cache in the memory"
    )
    min_throughput: float = _described(
        0.0, "tokens/s of a forward pass on this machine, measured in the screen (0: no limit)", ge=0
    )
    throughput_tokens: int = _described(128, "sequence length of the throughput measurement", ge=1)
