"""The rows of `benchmarks/gpu_acceptance.py`, one function each; each runs in its own process.

A row returns a dict: `figure` (what it measured, one line), `threshold` (the pass rule and why),
`verdict`, `measured` (the numbers) and optionally `detail` (e.g. the demo's closing table). Every row
reuses nas's code (the demo, `kd_throughput.py`'s step, the memory plan, the trial loop, the screen,
the CLI) and builds its models with random weights at the row's shape: on the lent GPU nothing can
be downloaded, and speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from pathlib import Path

import torch

from benchmarks.common import Context, RandomTokens, random_model

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
REAL_TEACHER, BIG_TEACHER = "Qwen3-1.7B", "Qwen3-8B"  # rows 3-4 and the screen's projection
# the shapes of row 2 (kd_throughput.py's flags): a 0.74B teacher (hidden 2048, 12 layers, vocab 32k)
# and its 0.14B student, 8 x 2048 tokens a step (3.8e13 FLOP: ~0.1 s on an H200, well past launch costs)
KD_SHAPE = {"hidden-size": 2048, "num-layers": 12, "batch-size": 8, "seq-len": 2048, "steps": 8, "warmup": 3}
KD_SMOKE = {"hidden-size": 64, "num-layers": 2, "batch-size": 2, "seq-len": 64, "steps": 2, "warmup": 1,
            "vocab-size": 1024}  # fmt: skip
MFU_FLOOR = 0.20  # row 2: under a fifth of the bf16 peak the step is not matmul-bound (see the README)
SCREEN_GOAL_MINUTES = 60.0  # row 4: an 8B space screened within an hour on one GPU (see the README)
SCREEN_SAMPLE = 24  # row 4: candidates timed, spread over the space (3 at smoke size)
TRIAL_STEPS = 3  # row 3: optimizer steps of the real trial (the second step has the optimizer states)
log = logging.getLogger("gpu_acceptance")


# ---- shared helpers -----------------------------------------------------------------------------


def benchmark(name: str):
    """A sibling benchmark script as a module (`benchmarks.<name>`)."""
    return importlib.import_module(f"benchmarks.{name}")


def teacher_config(ctx: Context, name: str):
    """The shipped config of `name` (published values), or at smoke size a tiny Qwen3 of the same family."""
    from nas.model.load import load_config
    from nas.testing import tiny_config

    if not ctx.smoke:
        return CONFIGS / name, load_config(CONFIGS / name)
    path = ctx.work / f"tiny-{name}"
    layers = 4 if name == BIG_TEACHER else 2
    tiny_config(
        "qwen3", vocab_size=512, hidden_size=64, ffn_hidden_size=128, num_layers=layers
    ).save_pretrained(path)
    return path, load_config(path)


def largest_candidate(config, budget: str, space=None):
    from nas.model.arch import Arch
    from nas.model.size import count_params
    from nas.prune.space import enumerate_budgets

    spaces = enumerate_budgets(Arch.from_hf_config(config), [budget], space)
    return max(spaces[budget], key=count_params), spaces[budget]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**8 else f"{n / 1e6:.2f}M"


# ---- row 1: the demo -----------------------------------------------------------------------------


def demo_row(ctx: Context) -> dict:
    from benchmarks._smoke import tiny_plan  # every benchmark's smoke size of the demo
    from nas.demo.run import closing_table, demo_plan, run_demo

    plan = tiny_plan(demo_plan(ctx.demo_minutes)) if ctx.smoke else demo_plan(ctx.demo_minutes)
    os.chdir(ctx.work)  # the demo writes reports/demo.html under the working directory
    result = run_demo(ctx.work / "demo", device=str(ctx.device), plan=plan)
    t, w, s = result.teacher_val_loss, result.winner_val_loss, result.scratch_val_loss
    gain = s - w
    ok = all(map(math.isfinite, (t, w, s))) and w < result.teacher.unigram_loss and gain > 0
    return {
        "figure": f"{result.seconds / 60:.1f} min at --minutes {ctx.demo_minutes:g}; val loss teacher {t:.3f}, "
        f"winner {w:.3f}, scratch {s:.3f} (KD gain {gain:+.3f})",
        "threshold": "every stage ran on the device; winner below the unigram baseline and below scratch",
        "verdict": ctx.verdict(ok),
        "measured": {
            "seconds": result.seconds,
            "stage_seconds": result.stage_seconds,
            "teacher_val_loss": t,
            "winner_val_loss": w,
            "scratch_val_loss": s,
            "unigram_loss": result.teacher.unigram_loss,
            "kd_gain": gain,
            "winner": result.winner_label,
        },  # fmt: skip
        "detail": closing_table(result),
    }


# ---- row 2: the KD step --------------------------------------------------------------------------


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The bf16 matrix-product ceiling of this GPU, measured (random data, CUDA events, after warm-up)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def kd_row(ctx: Context) -> dict:
    kd = benchmark("kd_throughput")
    shape = KD_SMOKE if ctx.smoke else KD_SHAPE
    argv = ["--device", str(ctx.device), "--variant", "fused"]
    argv += [x for key, value in shape.items() for x in (f"--{key}", str(value))]
    r = kd.run_variant(kd.parse_args(argv))
    # kd_throughput.py's count: 2 FLOP per teacher parameter (forward) and 6 per student parameter
    # (forward + backward) per token; attention scores are left out, so this MFU is a lower bound
    achieved = r["tokens_per_s"] * (2 * r["n_teacher"] + 6 * r["n_student"]) / 1e12
    measured = {**{k: r[k] for k in ("tokens_per_s", "n_teacher", "n_student")}, "tflops": achieved}
    figure = f"{r['tokens_per_s']:,.0f} tokens/s ({params(r['n_teacher'])} teacher, {params(r['n_student'])} student)"
    threshold = f"MFU >= {MFU_FLOOR:.0%} of the GPU's dense bf16 peak (datasheet)"
    if not ctx.cuda:
        return {
            "figure": figure + "; MFU: no GPU",
            "threshold": threshold,
            "verdict": "no GPU",
            "measured": measured,
        }
    name = torch.cuda.get_device_name()
    # NVIDIA's datasheets, dense bf16 without sparsity: H100/H200 SXM 989 TFLOP/s, A100 312 (kd_throughput.py)
    peak = next((v for k, v in kd.PEAK_BF16_TFLOPS.items() if k in name), None)
    ceiling = matmul_tflops()
    measured |= {"gpu": name, "peak_tflops": peak, "matmul_tflops": ceiling,
                 "mfu": achieved / peak if peak else None}  # fmt: skip
    mfu = f"MFU {achieved / peak:.1%} of {peak:.0f}" if peak else f"no datasheet peak for {name}"
    figure += f"; {achieved:.0f} TFLOP/s = {mfu}, {achieved / ceiling:.0%} of a measured 8192^3 matmul ({ceiling:.0f})"
    ok = peak is not None and achieved / peak >= MFU_FLOOR
    return {"figure": figure, "threshold": threshold, "verdict": ctx.verdict(ok), "measured": measured}


# ---- row 3: the memory plan against a real trial -------------------------------------------------


def trial_study(teacher_dir: Path, optimizer: str, smoke: bool, out: Path) -> dict:
    """A study of the teacher at 50% with bf16-mixed and `optimizer`: 4 x 2048 tokens a step, no
    gradient checkpointing (the activations, the plan's hardest part, are all there), one
    validation batch."""
    seq_len, batch = (32, 2) if smoke else (2048, 4)
    return {
        "name": f"memory-{optimizer}", "teacher": str(teacher_dir), "budget": "50%", "out_dir": str(out),
        "data": {"seq_len": seq_len, "sources": [{"path": "unused.txt"}]},
        "distill": {"batch_size": batch, "eval_batch_size": batch, "eval_sequences": batch,
                    "gradient_checkpointing": False, "precision": "bf16-mixed", "optimizer": optimizer},
    }  # fmt: skip


def real_trial_peak(ctx: Context, cfg, teacher_hf, arch) -> int | None:
    """`torch.cuda.max_memory_allocated` over a real trial (`distill`, the trial's settings, a few
    steps and its validation) of random-init models; None on the CPU, where the trial still runs."""
    from nas.device import precision_for
    from nas.search.horizon_plan import resolve
    from nas.train.loop import distill

    policy = precision_for(cfg.distill.precision, ctx.device)
    teacher = random_model(teacher_hf, policy.teacher_dtype, ctx.device).eval()
    student = random_model(arch.to_hf_config(teacher_hf), policy.student_dtype, ctx.device)
    run = resolve(cfg).short_distill(cfg).replace(
        steps=TRIAL_STEPS, eval_every=0, checkpoint_every=0, device=str(ctx.device)
    )
    data = RandomTokens(cfg.data.seq_len, teacher_hf.vocab_size)
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the models stay resident, as in a trial
    # torchao compiles its update on CUDA; the CPU smoke runs it eagerly (no C++ toolchain needed)
    stance = "default" if ctx.cuda else "force_eager"
    with torch.compiler.set_stance(stance):
        distill(teacher, student, data, run, ctx.work / "trial")
    return torch.cuda.max_memory_allocated() if ctx.cuda else None


def memory_row(ctx: Context, optimizer: str) -> dict:
    from nas.plan import plan_study
    from nas.plan.stages import HEADROOM
    from nas.settings import run_config_from_dict

    teacher_dir, teacher_hf = teacher_config(ctx, REAL_TEACHER)
    from nas.model.arch import Arch
    from nas.search.horizon_plan import fix_horizon

    cfg = run_config_from_dict(trial_study(teacher_dir, optimizer, ctx.smoke, ctx.work / "study"))
    cfg = fix_horizon(cfg, Arch.from_hf_config(teacher_hf))  # the trial's steps: the study's horizon in tokens
    arch, _ = largest_candidate(teacher_hf, "50%", cfg.space)
    gpu_memory = torch.cuda.get_device_properties(0).total_memory if ctx.cuda else 80 * 10**9
    start = time.perf_counter()
    plan = next(
        p for p in plan_study(cfg, gpu_memory, student=arch) if (p.stage, p.policy) == ("trial", "configured")
    )
    planned_s = time.perf_counter() - start
    peak = real_trial_peak(ctx, cfg, teacher_hf, arch)
    measured = {"student": arch.describe(), "plan_bytes": plan.peak_bytes, "plan_phase": plan.phase,
                "plan_breakdown": plan.breakdown, "plan_seconds": planned_s, "measured_bytes": peak}  # fmt: skip
    shape = f"{'tiny' if ctx.smoke else REAL_TEACHER} -> {arch.describe()}, {cfg.distill.batch_size}x{cfg.data.seq_len}"
    threshold = f"0.8 x plan <= real <= plan / {HEADROOM} (the plan's headroom)"
    if peak is None:
        return {"figure": f"{shape}: plan {gib(plan.peak_bytes)}; real: no GPU", "threshold": threshold,
                "verdict": "no GPU", "measured": measured}  # fmt: skip
    measured["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    ratio = peak / plan.peak_bytes
    ok = 0.8 <= ratio <= 1 / HEADROOM
    return {"figure": f"{shape}: plan {gib(plan.peak_bytes)} ({plan.phase}), real {gib(peak)} = {ratio:.2f}x plan",
            "threshold": threshold, "verdict": ctx.verdict(ok), "measured": measured}  # fmt: skip


# ---- row 4: the screen's speed -------------------------------------------------------------------


def time_screen(ctx: Context, name: str, n: int) -> tuple[float, list, list]:
    """Seconds per candidate of `nas.search.funnel.screen` over `n` candidates spread over the 50% space
    of a random-init `name` (the study defaults: 8 validation sequences of 512 tokens, one batch);
    with the candidates timed and the whole space."""
    from nas.device import precision_for
    from nas.prune.importance import compute_importance
    from nas.search.funnel import screen
    from nas.settings import DataConfig
    from nas.settings.search import SearchConfig

    _, config = teacher_config(ctx, name)
    teacher = random_model(config, precision_for("auto", ctx.device).teacher_dtype, ctx.device).eval()
    data = RandomTokens(32 if ctx.smoke else DataConfig.model_fields["seq_len"].default, config.vocab_size)
    importance = compute_importance(teacher, data.calib(16), data.val(4), batch_size=8)
    _, space = largest_candidate(config, "50%")
    picked = [space[i * (len(space) - 1) // max(n - 1, 1)] for i in range(n)]  # largest to smallest
    sequences = data.val(SearchConfig().screen_sequences)
    screen(teacher, importance, {"50%": picked[:1]}, sequences)  # warm-up: kernels, allocator
    start = time.perf_counter()
    screen(teacher, importance, {"50%": picked}, sequences)
    return (time.perf_counter() - start) / n, picked, space


def mean_params(archs: list) -> float:
    from nas.model.size import count_params

    return sum(map(count_params, archs)) / len(archs)


def screen_row(ctx: Context) -> dict:
    n = 3 if ctx.smoke else SCREEN_SAMPLE
    seconds, picked, space = time_screen(ctx, REAL_TEACHER, n)
    _, big_hf = teacher_config(ctx, BIG_TEACHER)
    _, big_space = largest_candidate(big_hf, "50%")
    # the screen of a candidate is its cut (index-select of its weights) and one forward: both scale
    # with its parameters, so the 8B space costs the mean-params ratio more per candidate
    ratio = mean_params(big_space) / mean_params(picked)
    projected = len(big_space) * seconds * ratio / 60
    # the projection checked: a few 8B candidates timed (16 GB of bf16 weights: fits one GPU)
    big_seconds, big_picked, _ = time_screen(ctx, BIG_TEACHER, 2 if ctx.smoke else 4)
    measured_8b = len(big_space) * big_seconds * mean_params(big_space) / mean_params(big_picked) / 60
    measured = {"seconds_per_candidate": seconds, "candidates_per_minute": 60 / seconds, "timed": n,
                "space": len(space), "big_space": len(big_space), "params_ratio": ratio, "projected_minutes": projected,
                "big_seconds_per_candidate": big_seconds, "big_minutes_from_measured": measured_8b}  # fmt: skip
    return {
        "figure": f"{60 / seconds:,.1f} candidates/min ({n} of {len(space)}); {BIG_TEACHER} 50% ({len(big_space)} "
        f"candidates, {ratio:.1f}x params): {projected:.0f} min projected, {measured_8b:.0f} min from "
        f"{len(big_picked)} timed 8B candidates",
        "threshold": f"both 8B figures <= {SCREEN_GOAL_MINUTES:.0f} min",
        "verdict": ctx.verdict(max(projected, measured_8b) <= SCREEN_GOAL_MINUTES),
        "measured": measured,
    }
