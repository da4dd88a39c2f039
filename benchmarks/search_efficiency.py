"""Exhaustive search vs nas's pruned search, side by side on one tiny teacher trained on real text.

Both studies see the same teacher, data, importance, candidates and short-KD settings. The
exhaustive study (sampler "exhaustive") distills every candidate for the whole horizon (pruner
"none"); ours is the default funnel: the best screen_top by zero-shot (pruned, no KD) loss, with
successive halving.
Printed: the KD tokens our search spent as a share of the exhaustive one's, whether both pick
the same winner, and Kendall tau between the two rankings of the candidates ours distilled (ours
ranks a stopped candidate below every candidate that went further, then by its last loss).
Goal: <= 1/3 of the tokens with the same winner.

    python -m benchmarks.search_efficiency [--horizon 60] [--teacher-steps 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.model.arch import KNOBS
from nas.pipeline import search  # noqa: E402
from nas.search.study import TrialRecord, kendall_tau
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config, train_tiny_teacher


def ranking(study: optuna.Study) -> list[tuple[int, ...]]:
    """Candidates best first: further-trained before stopped, then by the last reported loss."""
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))

    def key(t):
        last = max(t.intermediate_values)
        return (-last, t.intermediate_values[last])

    return [tuple(t.params[k] for k in KNOBS) for t in sorted(trials, key=key)]


def tokens_spent(study: optuna.Study) -> int:
    return sum(
        TrialRecord.read(t).tokens or 0
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    )


STEP_TOKENS = 8 * 64  # tokens of one optimizer step of the trials below: batch_size x seq_len


def run(root: Path, name: str, sampler: str, pruner: str, args) -> tuple[optuna.Study, float]:
    horizon = args.horizon
    config = tiny_study_config(
        root,
        name=name,
        budget="70%",
        data={"seq_len": 64},
        space={"tolerance": args.tolerance, "steps": {"hidden_size": 16, "ffn_hidden_size": 16}},
        search={"strategy": sampler, "pruner": pruner, "horizon_tokens": horizon * STEP_TOKENS,
                "rung_tokens": max(1, horizon // 6) * STEP_TOKENS},
        # 64 validation sequences (4k tokens): the loss gaps between candidates are ~0.01 nats
        distill={
            "batch_size": 8,
            "lr": 2e-3,
            "min_lr": 2e-4,
            "eval_sequences": args.eval_sequences,
            "checkpoint_every": 0,
            "log_every": 10,
        },
    )
    start = time.perf_counter()
    _, study = search(run_config_from_dict(config))
    return study, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizon", type=int, default=60, help="short-KD steps per candidate")
    parser.add_argument(
        "--teacher-steps", type=int, default=300, help="LM training steps of the tiny teacher"
    )
    parser.add_argument("--tolerance", type=float, default=0.2, help="budget window of the space")
    parser.add_argument("--eval-sequences", type=int, default=64, help="validation sequences of every trial")
    args = smoke.parse(parser, horizon=2, teacher_steps=2, tolerance=0.05, eval_sequences=4)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tiny_teacher(root, steps=args.teacher_steps)
        exhaustive, t_exh = run(root, "exhaustive", "exhaustive", "none", args)
        ours, t_ours = run(root, "halving", "auto", "successive-halving", args)
        full, fast = ranking(exhaustive), ranking(ours)
        position = {c: i for i, c in enumerate(fast)}
        ranked = [c for c in full if c in position]  # the funnel distills its shortlist only
        tau = kendall_tau(list(range(len(ranked))), [position[c] for c in ranked])
        ratio = tokens_spent(ours) / tokens_spent(exhaustive)
        final = {
            tuple(t.params[k] for k in KNOBS): t.value
            for t in exhaustive.get_trials(states=(TrialState.COMPLETE,))
        }
        print(f"candidates: {len(full)}; horizon {args.horizon} steps")
        print(f"exhaustive: {tokens_spent(exhaustive):,} KD tokens in {t_exh:.1f} s; winner {full[0]}")
        print(f"nas search: {tokens_spent(ours):,} KD tokens in {t_ours:.1f} s; winner {fast[0]}")
        print(f"tokens ratio (nas / exhaustive): {ratio:.3f}  (goal <= 0.333)")
        print(
            f"same winner: {full[0] == fast[0]}  (our winner is #{full.index(fast[0]) + 1} of the exhaustive ranking, "
            f"regret {final[fast[0]] - final[full[0]]:+.4f} nats of val loss)"
        )
        print(f"Kendall tau of the rankings of the {len(ranked)} candidates both distilled: {tau:.3f}")


if __name__ == "__main__":
    main()
