"""Trial step speed: what each step-speed setting of [distill] changes, side by side, in nas's own trial loop.

    python -m benchmarks.trial_speed --smoke                  # tiny shapes on the CPU (what the test runs)
    python -m benchmarks.trial_speed --device cuda            # Qwen3-8B -> L36 H2048 F6144 A32/G8, 4 x 2048

Every variant runs `nas.train.loop.distill` (the trial's loop: bf16-mixed on CUDA, the fused KD loss, the
run's AdamW) on the same random-init teacher and a fresh random-init student of the same shape, on the
same random token batches, and reads its steady tokens/s and MFU (`nas.train.speed`: the train steps
after the warm-up, no evaluation, no write) and the peak memory (CUDA). The reference is the defaults
(`attention = "auto"`, which is sdpa for these models, set explicitly here because the teacher is shared
and a variant's attention stays on it; `fused_optimizer = true`, the whole batch in one micro-batch, no
compile); each other variant changes one setting, and the last adds compile to the defaults:

| variant | what differs from the defaults |
|---|---|
| eager attention | `attention = "eager"`: the scores materialised (memory grows with seq_len^2) |
| foreach AdamW | `fused_optimizer = false` |
| micro-batch 1 | `batch_size = 1`, `grad_accum = B`: the same tokens a step in B micro-batches |
| flash_attention_2 | only where the flash-attn package is installed |
| compile | `compile = true` (its compilation falls in the warm-up steps, reported apart as `warmup_s`) |

A variant that runs out of memory is recorded as such (on one GPU, eager attention at 4 x 2048 may). The
teacher is built once; compiled layers stay compiled, so the compiled variant runs last. The issue's
figure at the default shape, one H200: ~10,100 tokens/s = 33.5% MFU (issue 31, without these settings
recorded). At `--smoke` size compile runs eagerly (`torch.compiler.set_stance("force_eager")`): the
path is exercised, its speed is not.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _smoke as smoke  # --smoke

HERE = Path(__file__).resolve().parent
# the measured 8B trial: Qwen3-8B -> L36 H2048 F6144 A32/G8 (2.74B), 4 x 2048 tokens a step
STUDENT = "num_layers=36,hidden_size=2048,ffn_hidden_size=6144,num_attention_heads=32,num_query_groups=8"
VARIANTS = {  # name -> the DistillConfig fields that differ from the defaults (None: the micro-batch case)
    "defaults": {},
    "eager attention": {"attention": "eager"},
    "foreach AdamW": {"fused_optimizer": False},
    "micro-batch 1": None,
    "flash_attention_2": {"attention": "flash_attention_2"},
    "compile": {"compile": True},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher", default=str(HERE / "configs" / "Qwen3-8B"), help="a config directory")
    p.add_argument("--student", default=STUDENT, help="the student's knobs, k=v,... (the rest: the teacher's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="steps per variant, the first 2 are the warm-up")
    p.add_argument("--only", help="comma-separated variants (default all): " + ", ".join(VARIANTS))
    p.add_argument("--out", help="also write the rows as JSON here")
    return smoke.parse(p, argv, teacher="tiny", student="num_layers=2,hidden_size=32,ffn_hidden_size=64",
                       batch_size=2, seq_len=32, steps=3)  # fmt: skip


def models(args, device: torch.device):
    """The teacher's config, its random-init model (in the run's teacher dtype) and the student's config."""
    from transformers import AutoModelForCausalLM

    from nas.device import precision_for
    from nas.model.arch import Arch
    from nas.model.load import load_config
    from nas.testing import tiny_config

    config = tiny_config("qwen3", vocab_size=512) if args.teacher == "tiny" else load_config(args.teacher)
    knobs = {k: int(v) for k, v in (kv.split("=") for kv in args.student.split(","))}
    student_config = Arch.from_hf_config(config).replace(**knobs).to_hf_config(config)
    torch.manual_seed(0)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, dtype=precision_for("auto", device).teacher_dtype)
    return config, teacher.eval(), student_config


class RandomTokens:
    """`TokenData`'s batch interface over seeded random token ids (speed does not see the values)."""

    fingerprint = "random"

    def __init__(self, seq_len: int, vocab_size: int) -> None:
        self.seq_len, self.vocab_size = seq_len, vocab_size

    def train_batch(self, index: int, batch_size: int, total: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (batch_size, self.seq_len),
                             generator=torch.Generator().manual_seed(index))  # fmt: skip

    def val(self, n: int) -> torch.Tensor:
        return self.train_batch(10**6, n, 0)


def run_variant(name: str, args, teacher, student_config, device: torch.device, work: Path) -> dict:
    """One variant's steady tokens/s, MFU, warm-up seconds and peak memory (or its error)."""
    from transformers import AutoModelForCausalLM

    from nas.device import precision_for
    from nas.settings import DistillConfig
    from nas.train.loop import distill
    from nas.train.speed import Speed

    fields = {"attention": "sdpa", **(VARIANTS[name] or {})}  # the shared teacher keeps a variant's attention
    micro = VARIANTS[name] is None
    shape = {"batch_size": 1, "grad_accum": args.batch_size} if micro else {"batch_size": args.batch_size}
    cfg = DistillConfig(steps=args.steps, eval_every=0, eval_sequences=1, eval_batch_size=1, checkpoint_every=0,
                        log_every=0, warmup_steps=0, device=str(device), **shape, **fields)  # fmt: skip
    torch.manual_seed(1)
    with torch.device(device):
        student = AutoModelForCausalLM.from_config(student_config, dtype=precision_for("auto", device).student_dtype)
    speed = Speed()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stance = "default" if device.type == "cuda" else "force_eager"  # the CPU smoke: no compilation
    try:
        with torch.compiler.set_stance(stance):
            distill(teacher, student, RandomTokens(args.seq_len, student_config.vocab_size), cfg, work / name,
                    speed=speed, write=False)  # fmt: skip
        row = {"tokens_per_s": speed.tokens_per_s, "mfu": speed.mfu, "warmup_s": speed.warmup_seconds,
               "steady_steps": speed.record()["steady_steps"]}  # fmt: skip
    except torch.OutOfMemoryError:
        row = {"error": "out of memory"}
    except Exception as e:  # e.g. flash_attention_2 refused: that variant alone
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    del student
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def selected(args) -> list[str]:
    names = [n.strip() for n in args.only.split(",")] if args.only else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"trial_speed: error: --only: unknown variant(s) {', '.join(sorted(unknown))}")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None or not args.device.startswith("cuda"):
        names = [n for n in names if n != "flash_attention_2"]  # needs the flash-attn package and CUDA
    return sorted(names, key=lambda n: n == "compile")  # compile last: compiled layers stay compiled


def measure(args) -> dict:
    """Every selected variant side by side; each row with its ratio to the defaults."""
    device = torch.device(args.device)
    _, teacher, student_config = models(args, device)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="nas-trial-speed-") as work:
        for name in selected(args):
            start = time.perf_counter()
            rows[name] = run_variant(name, args, teacher, student_config, device, Path(work))
            rows[name]["wall_s"] = time.perf_counter() - start
            print(f"[trial_speed] {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    base = rows.get("defaults", {}).get("tokens_per_s")
    for row in rows.values():
        if base and row.get("tokens_per_s"):
            row["vs_defaults"] = row["tokens_per_s"] / base
    return {"device": str(device), "teacher": args.teacher, "student": args.student,
            "tokens_per_step": args.batch_size * args.seq_len, "rows": rows}  # fmt: skip


def table(record: dict) -> str:
    lines = [f"{'variant':<20}{'tokens/s':>12}{'vs defaults':>13}{'MFU':>8}{'warm-up s':>11}{'peak GiB':>10}"]
    for name, r in record["rows"].items():
        if "error" in r:
            lines.append(f"{name:<20}{r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") is not None else "-"
        lines.append(f"{name:<20}{r['tokens_per_s']:>12,.0f}{r.get('vs_defaults', 0):>12.2f}x{mfu:>8}"
                     f"{r['warmup_s']:>11.1f}{peak:>10}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    record = measure(args)
    print(f"trial speed on {record['device']}: {args.teacher} -> {args.student}, "
          f"{args.batch_size} x {args.seq_len} tokens a step, {args.steps} steps a variant")  # fmt: skip
    print(table(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
