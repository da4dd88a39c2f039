"""How good is nas's funnel? Its pick against the ground truth, on a deep teacher trained on real text.

Teacher: the demo's recipe (KJV chapters, a byte-level BPE tokenizer trained on them, a Llama with GQA
trained from scratch), made deeper (12 layers) so depth vs width is a real choice; cached on disk.
Space: every candidate of one budget (>= 40). Measured, side by side, with the same KD settings:
- nas: the funnel as `nas search` runs it (screen all, short-KD the best `screen_top` with successive
  halving, `finalists` to the horizon); its pick = the best completed trial;
- reference: every candidate distilled to the search horizon (the cost nas is compared with; gives
  each candidate's loss at the first rung and at the horizon);
- ground truth: every candidate distilled for 4x the horizon.
Printed: Kendall tau vs the ground truth of the screen, of the first rung and of the horizon; the regret
(ground-truth loss of the pick minus the best) of nas's pick and of the screen's pick; nas's KD tokens as
a share of "every candidate to the horizon". Goal: regret <= 0.01 nats at <= 1/3 of the tokens.

    OMP_NUM_THREADS=1 python benchmarks/search_quality.py [--horizon 12] [--out .nas_cache/search_quality]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import _smoke as smoke  # noqa: E402  (benchmarks/_smoke.py: --smoke)
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from nas.data.tokens import prepare  # noqa: E402
from nas.demo.teacher import (  # noqa: E402
    TeacherSpec,
    load_teacher_info,
    teacher_key,
    train_teacher,
    train_texts,
    train_tokenizer,
    write_corpus,
)
from nas.model.arch import Arch  # noqa: E402
from nas.pipeline import search  # noqa: E402
from nas.prune.cut import prune  # noqa: E402
from nas.prune.space import enumerate_candidates  # noqa: E402
from nas.search.funnel import screen  # noqa: E402
from nas.search.study import arch_key, best_trial, kendall_tau  # noqa: E402
from nas.settings import run_config_from_dict  # noqa: E402
from nas.train.loop import distill  # noqa: E402

log = logging.getLogger("search_quality")
TEACHER = TeacherSpec(hidden_size=128, num_layers=12, num_attention_heads=4, num_query_groups=2, head_dim=32,
                      ffn_hidden_size=384, vocab_size=1024, steps=500, batch_size=16, warmup_steps=30)  # fmt: skip


def teacher_and_data(out: Path, seq_len: int, spec: TeacherSpec = TEACHER, max_documents: int | None = None):
    """The cached 12-layer teacher (trained on first use) and the tokenized KJV."""
    from transformers import AutoTokenizer

    corpus = write_corpus(out / "corpus", max_documents)
    key = teacher_key(spec, seq_len, corpus)
    data_cfg = {"seq_len": seq_len, "cache_dir": str(out / "cache"), "sources": [{"path": str(corpus)}]}
    probe = run_config_from_dict({"name": "probe", "teacher": "-", "data": data_cfg})
    if load_teacher_info(out / "teacher", key) is not None:
        tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    else:
        tokenizer = train_tokenizer(train_texts(corpus, probe.data), spec.vocab_size)
    data = prepare(probe.data, tokenizer)
    info = train_teacher(spec, key, tokenizer, data, out, 32)
    return info, data_cfg


def study_config(out: Path, data_cfg: dict, args) -> dict:
    return {
        "name": "search_quality",
        "teacher": str(out / "teacher"),
        "out_dir": str(out / "study"),
        "budget": args.budget,
        "data": data_cfg,
        "space": {"tolerance": args.tolerance, "steps": {"hidden_size": 16, "ffn_hidden_size": 32}},
        "importance": {"num_samples": 64, "val_sequences": 16, "batch_size": 16},
        "search": {
            "horizon_steps": args.horizon,
            "eval_every": args.horizon // 4,
            "reduction_factor": 2,
            "screen_top": args.screen_top,
            "finalists": args.finalists,
            "screen_sequences": 16,
            "top_k": 5,
        },  # fmt: skip
        "distill": {"batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, "eval_sequences": args.eval_sequences,
                    "checkpoint_every": 0},
    }


def distill_all(ctx, candidates, steps: int, eval_every: int, work: Path) -> dict[tuple, list[dict]]:
    """Every candidate pruned and distilled for `steps` with the search's settings: key -> val curve."""
    settings = ctx.cfg.short_distill().replace(steps=steps, eval_every=eval_every)
    curves = {}
    for i, arch in enumerate(candidates):
        student = prune(ctx.teacher, arch, ctx.importance, ctx.cfg.depth_strategy)
        result = distill(ctx.teacher, student, ctx.data, settings, work / str(i))
        shutil.rmtree(work / str(i), ignore_errors=True)
        curves[arch_key(arch)] = result.curve
        log.info(
            "%d/%d %s: val loss %.4f after %d steps",
            i + 1,
            len(candidates),
            arch.describe(),
            result.val_loss,
            steps,
        )
    return curves


def tau(scores: dict, truth: dict) -> float:
    keys = sorted(truth)
    return kendall_tau([scores[k] for k in keys], [truth[k] for k in keys])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".nas_cache/search_quality")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--budget", default="45%")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--screen-top", type=int, default=8)
    p.add_argument("--finalists", type=int, default=3)
    p.add_argument("--eval-sequences", type=int, default=48, help="validation sequences of every run")
    args = smoke.parse(p, out=tempfile.mkdtemp(prefix="nas-smoke-"), budget="50%", tolerance=0.1, horizon=4,
                       eval_sequences=8, screen_top=2, finalists=1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out, start = Path(args.out), time.perf_counter()
    spec = smoke.tiny_teacher(TEACHER) if args.smoke else TEACHER
    info, data_cfg = teacher_and_data(out, args.seq_len, spec, 150 if args.smoke else None)
    print(
        f"teacher: {info.params:,} params, {spec.num_layers} layers, val loss {info.val_loss:.3f} (unigram {info.unigram_loss:.3f})"
    )
    shutil.rmtree(out / "study", ignore_errors=True)
    cfg = run_config_from_dict(study_config(out, data_cfg, args))
    t0 = time.perf_counter()
    ctx, study = search(cfg)
    nas_seconds = time.perf_counter() - t0
    space = enumerate_candidates(ctx.teacher_arch, cfg.budget, cfg.space)
    t0 = time.perf_counter()  # the screen alone, timed again: per candidate vs a KD step
    screen(ctx.teacher, ctx.importance, {cfg.budget: space}, ctx.data.val(cfg.search.screen_sequences))
    screen_seconds = time.perf_counter() - t0
    screen_loss = {arch_key(s["arch"]): s["loss"] for s in study.user_attrs["screen"]}
    h, rung = args.horizon, args.horizon // 4
    t0 = time.perf_counter()
    reference = distill_all(ctx, space, h, rung, out / "work")
    ref_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth_curves = distill_all(ctx, space, 4 * h, 0, out / "work")
    truth_seconds = time.perf_counter() - t0
    truth = {k: c[-1]["val_loss"] for k, c in truth_curves.items()}
    at = {
        s: {k: next(p["val_loss"] for p in c if p["step"] == s) for k, c in reference.items()}
        for s in (rung, h)
    }
    best = min(truth.values())
    pick = arch_key(Arch.from_dict(best_trial(study).user_attrs["arch"]))
    screen_pick = min(screen_loss, key=screen_loss.get)
    nas_tokens = sum(
        t.user_attrs.get("tokens", 0)
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    )
    every = len(space) * h * study.user_attrs["tokens_per_step"]
    states = [t.state.name for t in study.trials]
    print(
        f"space: {len(space)} candidates at {cfg.budget} of the teacher; horizon {h} steps, first rung {rung}, ground truth {4 * h}"
    )
    print(
        f"nas: screened {len(screen_loss)}, distilled {len(states)} ({states.count('COMPLETE')} to the horizon)"
    )
    print(
        f"Kendall tau vs ground truth: screen {tau(screen_loss, truth):.3f}, first rung {tau(at[rung], truth):.3f}, horizon {tau(at[h], truth):.3f}"
    )
    print(
        f"regret (nats): nas's pick {truth[pick] - best:.4f} ({Arch.from_dict(best_trial(study).user_attrs['arch']).describe()}), "
        f"screen's pick {truth[screen_pick] - best:.4f}; best ground-truth loss {best:.4f}"
    )
    print(
        f"nas KD tokens: {nas_tokens:,} = {nas_tokens / every:.3f} of every candidate to the horizon ({every:,})"
    )
    print(
        f"goal (regret <= 0.01 at <= 1/3 of the tokens): {'met' if truth[pick] - best <= 0.01 and nas_tokens <= every / 3 else 'NOT met'}"
    )
    kd_step = ref_seconds / (len(space) * h)
    print(f"screen: {screen_seconds / len(space) * 1e3:.0f} ms a candidate = {screen_seconds / len(space) / kd_step:.2f} "
          f"KD steps (a KD step of the reference, evaluations included: {kd_step * 1e3:.0f} ms)")  # fmt: skip
    print(f"wall time: nas {nas_seconds:.0f} s, reference {ref_seconds:.0f} s, ground truth {truth_seconds:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.smoke:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
