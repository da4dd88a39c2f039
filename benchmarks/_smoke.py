"""`--smoke`: each benchmark's tiny size, a run of seconds whose numbers mean nothing. It is what
`tests/benchmarks/test_benchmarks.py` runs (`pytest -k smoke`), so that a benchmark broken by a change fails CI."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

SMOKE_HELP = "a tiny size that runs in seconds (what the benchmark's test runs; its numbers mean nothing)"
# the demo teacher at the size of tests/demo/test_demo.py's TINY plan
TINY_TEACHER = {"hidden_size": 64, "num_layers": 4, "num_attention_heads": 4, "num_query_groups": 2,
                "head_dim": 16, "ffn_hidden_size": 128, "vocab_size": 384, "steps": 4, "batch_size": 4,
                "warmup_steps": 1}  # fmt: skip


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None, **tiny: Any) -> argparse.Namespace:
    """`parser`'s arguments plus `--smoke`, which sets every argument named in `tiny` to its value."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in tiny.items():
            setattr(args, name, value)
    return args


def tiny_teacher(spec: Any) -> Any:
    """A `nas.demo.teacher.TeacherSpec` at the smoke size."""
    return dataclasses.replace(spec, **TINY_TEACHER)


def tiny_plan(plan: Any) -> Any:
    """A `nas.demo.run.DemoPlan` at the smoke size (the demo test's TINY plan)."""
    return dataclasses.replace(
        plan, seq_len=32, max_documents=60, eval_sequences=4, teacher=tiny_teacher(plan.teacher),
        space={"tolerance": 0.15, "steps": {"hidden_size": 32, "ffn_hidden_size": 64}},
        importance={"num_samples": 8, "val_sequences": 4, "batch_size": 8}, screen_top=2, finalists=1,
        horizon_tokens=2 * 2 * 32, rung_tokens=2 * 32, batch_size=2, final_steps=2,
    )  # fmt: skip
