"""Trials from the teacher cache vs online dense KD, side by side on the demo's teacher and search space.

The demo's corpus, BPE tokenizer and Llama teacher (`nas.demo.teacher`, trained here for
`--teacher-steps` steps), its budget and search space (`nas.demo.run.DemoPlan`). Every candidate is cut
from the teacher and distilled for the same horizon twice, from the same cut: once with online dense
KD (the teacher's forward in every step) and once from the study's teacher cache (top-k log-probs +
the rest mass, `nas.train.teacher_cache`); the two runs of a candidate alternate which goes first, so a
burst of load on a shared machine hits both. Printed:

- trial training tokens/s, cached vs dense (goal >= 1.4x), the one-off seconds to write the cache,
  and the break-even number of candidates (write cost / seconds saved per trial);
- disk bytes per token of the cache;
- Kendall tau between the rankings (by validation loss at the horizon) of every candidate, cached vs
  dense (goal >= 0.8), and whether the winner is the same (it must be);
- each candidate's validation-loss difference, cached - dense (mean |diff| and max |diff|).

    python -m benchmarks.teacher_cache [--horizon 12] [--teacher-steps 150] [--seq-len 64] [--topk 64]

The defaults are scaled down from the demo (seq_len 64 instead of 256, 400 of the KJV's chapters, 150
teacher steps instead of 210, a 12-step horizon instead of 30, one torch thread) so that the whole run
stays under ~10 minutes on a busy 2-core CPU machine; the teacher's shape, tokenizer and the search
space are the demo's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from benchmarks.common import demo_teacher_and_data  # noqa: E402
from nas.demo.run import DemoPlan  # noqa: E402
from nas.model.arch import Arch  # noqa: E402
from nas.prune.cut import prune  # noqa: E402
from nas.prune.importance import compute_importance  # noqa: E402
from nas.prune.space import enumerate_candidates  # noqa: E402
from nas.search.study import kendall_tau  # noqa: E402
from nas.settings import DistillConfig, SpaceConfig  # noqa: E402
from nas.train.loop import distill  # noqa: E402
from nas.train.teacher_cache import FILES, ensure_teacher_cache  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizon", type=int, default=12, help="short-KD steps per candidate")
    p.add_argument("--teacher-steps", type=int, default=150, help="LM training steps of the demo teacher")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--topk", type=int, default=64, help="teacher tokens kept per position")
    p.add_argument("--eval-sequences", type=int, default=48)
    p.add_argument("--max-documents", type=int, default=400, help="KJV chapters of the corpus")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more oversubscribe a busy machine)")
    p.add_argument("--out", default="", help="work directory (default: a temp directory)")
    p.add_argument("--max-candidates", type=int, default=0, help="distill only the first n candidates (0: all)")
    return smoke.parse(p, horizon=2, teacher_steps=4, seq_len=32, batch_size=2, topk=8, eval_sequences=4,
                       max_documents=60, max_candidates=2)


def setup(out: Path, args, plan: DemoPlan):
    """The demo's corpus, tokenizer, data and trained teacher (reused from `out` when already there)."""
    spec = dataclasses.replace(plan.teacher, steps=args.teacher_steps)
    tokenizer, data, info, _ = demo_teacher_and_data(
        out, spec, args.seq_len, args.eval_sequences, args.max_documents, "cpu"
    )
    teacher = AutoModelForCausalLM.from_pretrained(info.path).eval()
    return tokenizer, data, teacher, info


def kd_run(teacher_or_cache, student, data, cfg: DistillConfig, out: Path) -> dict:
    """One trial's short KD; tokens/s of the training steps alone (one metrics window over all of them)."""
    result = distill(teacher_or_cache, student, data, cfg, out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in rows if r["loss"] is not None]  # log_every = steps: one window
    seconds = result.tokens / train["tokens_per_s"]
    return {"val_loss": result.val_loss, "tokens_per_s": result.tokens / seconds, "seconds": seconds}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = smoke.tiny_plan(DemoPlan()) if args.smoke else DemoPlan()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        tokenizer, data, teacher, info = setup(out, args, plan)
        imp = plan.importance
        importance = compute_importance(
            teacher, data.calib(64), data.val(imp["val_sequences"]), imp["batch_size"]
        )
        teacher_arch = Arch.from_hf_config(teacher.config)
        candidates = enumerate_candidates(teacher_arch, plan.final_budget, SpaceConfig(**plan.space))
        candidates = candidates[: args.max_candidates or None]
        cfg = DistillConfig(steps=args.horizon, batch_size=args.batch_size, lr=plan.kd_lr, min_lr=plan.kd_lr / 10,
                            eval_every=0, eval_sequences=args.eval_sequences, checkpoint_every=0,
                            log_every=args.horizon, device="cpu")  # fmt: skip
        t0 = time.perf_counter()
        cache, _ = ensure_teacher_cache(out / "study", teacher, tokenizer, data, cfg, args.topk)
        write_seconds = time.perf_counter() - t0
        disk = sum((cache.directory / name).stat().st_size for name in FILES)
        print(f"teacher: {info.params:,} params, val loss {info.val_loss:.3f} (unigram {info.unigram_loss:.3f}), "
              f"{args.teacher_steps} steps; {len(candidates)} candidates; horizon {args.horizon} steps of "
              f"{args.batch_size}x{args.seq_len} tokens; top-{cache.settings.topk} of {cache.vocab_size}")  # fmt: skip
        dense, cached = [], []
        for i, arch in enumerate(candidates):
            runs = [("dense", teacher, dense), ("cached", cache, cached)]
            for name, source, results in runs if i % 2 == 0 else runs[::-1]:
                student = prune(teacher, arch, importance)
                results.append(kd_run(source, student, data, cfg, out / "trials" / f"{i}-{name}"))
            print(f"  {arch.describe():<40} dense {dense[-1]['val_loss']:.4f} ({dense[-1]['tokens_per_s']:,.0f} tok/s)"
                  f"  cached {cached[-1]['val_loss']:.4f} ({cached[-1]['tokens_per_s']:,.0f} tok/s)", flush=True)  # fmt: skip
        report(dense, cached, candidates, cache, write_seconds, disk, started)


def report(dense, cached, candidates, cache, write_seconds: float, disk: int, started: float) -> None:
    rate_dense = statistics.median(r["tokens_per_s"] for r in dense)
    rate_cached = statistics.median(r["tokens_per_s"] for r in cached)
    saved = statistics.median(d["seconds"] - c["seconds"] for d, c in zip(dense, cached, strict=True))
    trial_dense = statistics.median(r["seconds"] for r in dense)
    dense_loss = [r["val_loss"] for r in dense]
    cached_loss = [r["val_loss"] for r in cached]
    diffs = [c - d for c, d in zip(cached_loss, dense_loss, strict=True)]
    tau = kendall_tau(dense_loss, cached_loss)
    best_dense = min(range(len(dense)), key=dense_loss.__getitem__)
    best_cached = min(range(len(cached)), key=cached_loss.__getitem__)
    print(f"trial tokens/s (median over candidates): dense {rate_dense:,.0f}, cached {rate_cached:,.0f}: "
          f"{rate_cached / rate_dense:.2f}x  (goal >= 1.4x)")  # fmt: skip
    print(f"cache write (one-off, incl. hashing): {write_seconds:.1f} s = {write_seconds / trial_dense:.2f} dense "
          f"trials; saves {saved:.1f} s per trial: break-even after "
          f"{write_seconds / saved if saved > 0 else float('inf'):.1f} candidates")  # fmt: skip
    mass = 1.0 - float(np.exp(np.asarray(cache.rest, dtype=np.float64)).mean())
    print(f"teacher mass in its top-{cache.settings.topk}: {mass:.3f} on average (the rest is one bucket)")
    print(f"disk: {disk / cache.settings.tokens:.1f} bytes/token ({disk / 1e6:.1f} MB for "
          f"{cache.settings.tokens:,} tokens)")  # fmt: skip
    print(
        f"Kendall tau, cached vs dense ranking of all {len(candidates)} candidates: {tau:.3f}  (goal >= 0.8)"
    )
    print(f"same winner: {best_dense == best_cached}  (dense {candidates[best_dense].describe()}, "
          f"cached {candidates[best_cached].describe()})")  # fmt: skip
    print(f"val loss cached - dense: mean {statistics.mean(diffs):+.4f}, mean |diff| "
          f"{statistics.mean(abs(d) for d in diffs):.4f}, max |diff| {max(abs(d) for d in diffs):.4f}; "
          f"spread of the dense losses {max(dense_loss) - min(dense_loss):.4f}")  # fmt: skip
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
