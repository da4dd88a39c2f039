"""The GPU acceptance rows by name, and the child process that runs one (`gpu_acceptance.py --row NAME`).

Apart from the rows themselves so that the row modules (`_gpu_rows`, `_gpu_trials`, `_gpu_parallel`) import
each other one way only: rows 6-7 reuse `_gpu_rows`'s helpers, and only this table knows every row.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import torch

from benchmarks._gpu_rows import demo_row, kd_row, memory_row, screen_row
from benchmarks.common import Context


def run_row(name: str, args) -> int:
    """Run row `name` (this is the child process) and write its result to `args.result`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("torchao", "torch.utils._pytree"):  # import-time notices nobody can act on (as nas's CLI)
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ctx = Context(torch.device(args.device), args.smoke, Path(args.work), args.demo_minutes, Path(args.result))
    try:
        row = ROW_FUNCTIONS[name](ctx)
    except Exception as e:  # an OOM is one too (torch.OutOfMemoryError): the row records it, the run goes on
        traceback.print_exc()
        row = {"figure": "", "threshold": "", **ctx.partial, "verdict": "error",
               "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"}  # fmt: skip
    from nas.io import write_text_atomic

    write_text_atomic(args.result, json.dumps(row, default=float))
    return 0


ROW_FUNCTIONS = {
    "demo": demo_row,
    "kd_step": kd_row,
    "memory_adamw": lambda ctx: memory_row(ctx, "adamw"),
    "memory_8bit": lambda ctx: memory_row(ctx, "adamw-8bit"),
    "screen": screen_row,
    "parallel": lambda ctx: parallel_row(ctx),
    **{name: (lambda ctx, n=name: trial_row(ctx, n)) for name in ("trial_8b", "trial_qwen35", "trial_nemotron")},
    "speed": lambda ctx: speed_row(ctx),
}


def trial_row(ctx: Context, name: str) -> dict:
    from benchmarks._gpu_trials import TEACHERS  # rows 6a-6c
    from benchmarks._gpu_trials import trial_row as row

    return row(ctx, TEACHERS[name])


def speed_row(ctx: Context) -> dict:
    from benchmarks._gpu_trials import speed_row as row  # row 7

    return row(ctx)


def parallel_row(ctx: Context) -> dict:
    from benchmarks._gpu_parallel import parallel_row as row

    return row(ctx)
