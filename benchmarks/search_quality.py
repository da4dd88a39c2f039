"""Can nas's search tell candidates apart? Its pick and ranking against a ground truth of 10x the horizon.

Teacher: the demo's recipe (KJV chapters, a byte-level BPE tokenizer trained on them, a Llama with GQA
trained from scratch), 12 layers deep so depth vs width is a real choice; cached on disk. `--teacher` picks
another trained the same way (`TEACHERS`: a wider Llama, a Nemotron-H Mamba hybrid, a Qwen3-MoE). For each budget,
every candidate of the space is measured, with the same KD settings, in one run:
- nas: `nas search` as a user runs it (screen, funnel with the best of each depth and class, halving,
  the adaptive horizon); and nas with the halving over every candidate (sampler "exhaustive": the
  screen becomes a short first KD rung);
- brute force: every candidate distilled to the horizon and on through the same rungs as far as nas went
  (what nas is compared with, at the same fidelity; it also gives Kendall tau at every rung);
- ground truth: every candidate distilled in one run for `--truth-factor` (10) x the horizon (>= 300 steps),
  repeated on `--truth-seeds` (2) data orders: its loss is their mean, and a pair counts as resolved only when
  every seed orders it alike and its gap is beyond 2 standard errors of the read and of the seeds together.
Printed side by side per budget: the regret (ground-truth loss of a pick minus the best) and the KD
tokens of nas, the zero-shot pick (what ModelOpt does), ModelOpt's rule (the 10 candidates nearest the
budget, best zero-shot first), the largest candidate, and brute force; Kendall tau vs the ground truth at
each rung and for the extrapolated ranking; the ground truth's spread against its noise (the read's and the
seeds'), and how far its two seeds agree.

    OMP_NUM_THREADS=1 python -m benchmarks.search_quality [--smoke] [--out .nas_cache/search_quality]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks.common import demo_teacher_and_data  # noqa: E402
from nas.demo.teacher import TeacherSpec  # noqa: E402
from nas.evaluate.loss import sequence_losses  # noqa: E402
from nas.io import write_text_atomic  # noqa: E402
from nas.model.size import count_params  # noqa: E402
from nas.pipeline import search  # noqa: E402
from nas.prune.cut import prune  # noqa: E402
from nas.prune.space import enumerate_candidates  # noqa: E402
from nas.search import ranking  # noqa: E402
from nas.search.horizon import continued  # noqa: E402
from nas.search.horizon_plan import resolve  # noqa: E402
from nas.search.study import StudyRecord, TrialRecord, arch_key  # noqa: E402
from nas.search.wsd import distill_and_read, stable_state  # noqa: E402
from nas.settings import SearchConfig, run_config_from_dict  # noqa: E402
from nas.train.loop import distill  # noqa: E402

log = logging.getLogger("search_quality")
TEACHER = TeacherSpec(hidden_size=128, num_layers=12, num_attention_heads=4, num_query_groups=2, head_dim=32,
                      ffn_hidden_size=384, vocab_size=1024, steps=500, batch_size=16, warmup_steps=30)  # fmt: skip
# The teachers of `--teacher`, all trained by the same recipe on the same text: "deep" (the default) is 12 layers
# deep, so depth vs width is a real choice; "wide" is half as deep and 1.5x as wide; "hybrid" is a Nemotron-H
# with Nemotron Nano 2's layer mix (Mamba2 every 2nd layer, attention in 2 of 12, squared-ReLU MLPs between), so
# Mamba heads, their groups and the layer types are cut; "moe" is a Qwen3-MoE (8 experts, top 2), so experts are.
TEACHERS = {
    "deep": TEACHER,
    "wide": replace(TEACHER, num_layers=6, hidden_size=192, num_attention_heads=6, ffn_hidden_size=576),
    "hybrid": replace(TEACHER, model_type="nemotron_h", extras={
        "layers_block_type": ["linear_attention", "mlp", "linear_attention", "full_attention"]
        + ["linear_attention", "mlp"] * 2 + ["linear_attention", "full_attention", "linear_attention", "mlp"],
        "mamba_num_heads": 8, "mamba_head_dim": 32, "n_groups": 2, "ssm_state_size": 16, "conv_kernel": 4,
        "chunk_size": 16, "mlp_hidden_act": "relu2"}),
    "moe": replace(TEACHER, model_type="qwen3_moe", num_layers=8, ffn_hidden_size=128, extras={
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": True}),
}  # fmt: skip


def smoke_teacher(spec: TeacherSpec) -> TeacherSpec:
    """`spec` at the smoke size: 4 layers (a hybrid: its first 4 layer types) of width 64, 20 steps."""
    extras = dict(spec.extras)
    if "layers_block_type" in extras:
        extras["layers_block_type"] = extras["layers_block_type"][:4]
    return replace(spec, num_layers=4, hidden_size=64, ffn_hidden_size=128, steps=20, vocab_size=512, extras=extras)


# Space steps a teacher adds to `--step`'s: the hybrid's Mamba heads cut in pairs and their head_dim kept, its
# MLPs in steps of 128 (21 candidates at 30% instead of 155: brute force and the ground truth fit on 2 CPU cores)
TEACHER_STEPS = {"hybrid": {"ffn_hidden_size": 128, "num_mamba_heads": 2, "mamba_head_dim": 32}}
MODELOPT_TOP_K = 10  # ModelOpt's Minitron NAS scores the top_k=10 candidates nearest the budget


def teacher_and_data(out: Path, seq_len: int, spec: TeacherSpec):
    """The cached teacher (trained on first use) and the data settings of the tokenized KJV."""
    _, _, info, data_cfg = demo_teacher_and_data(out, spec, seq_len, eval_sequences=32)
    return info, data_cfg.to_dict()


def study_config(out: Path, data_cfg: dict, args, name: str, sampler: str) -> dict:
    tokens_per_step = args.batch_size * args.seq_len
    return {
        "name": name,
        "teacher": str(out / "teacher"),
        "out_dir": str(out / name),
        "budget": args.budgets.split(","),
        "data": data_cfg,
        "space": {"tolerance": args.tolerance, "steps": {"hidden_size": args.step, "ffn_hidden_size": 2 * args.step}
                  | TEACHER_STEPS.get(args.teacher, {})},
        "importance": {"num_samples": 64, "val_sequences": 16, "batch_size": 16},
        "search": {"horizon_tokens": args.horizon * tokens_per_step, "strategy": sampler, "screen_sequences": 16,
                   "rung_schedule": args.rung_schedule}
        | ({"max_horizon_factor": 2, "screen_top": 3, "finalists": 2, "stable_top": 2} if args.smoke else {}),
        # eval_batch_size: 128 sequences of 32 tokens per forward (4,096 tokens; nas's default of 8 is sized for
        # seq_len 4096): at 8 the reads of 1,024 sequences took most of a trial's time on these tiny models
        "distill": {"batch_size": args.batch_size, "lr": 1e-3, "min_lr": 1e-4, "eval_sequences": args.eval_sequences,
                    "eval_batch_size": 128, "checkpoint_every": 0},
        "final": {"tokens": args.truth_factor * args.horizon * tokens_per_step},  # what the extrapolation predicts
    }  # fmt: skip


def study_tokens(study, budget: str) -> int:
    """KD tokens a study spent on `budget`: its trials' and its adaptive horizon's."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    own = sum(int(t.user_attrs.get("tokens", 0)) for t in trials if t.user_attrs.get("budget") == budget)
    return own + int((StudyRecord.read(study).horizon or {}).get(budget, {}).get("tokens", 0))


def brute_force(ctx, space, stop_tokens: int, work: Path, store: Path) -> dict[tuple, list[tuple[int, float]]]:
    """Every candidate to the horizon (read at its end) and on through the adaptive horizon's rungs
    (`nas.search.horizon.continued`, and with `rung_schedule` wsd each read after its decay branch,
    `nas.search.wsd`) up to `stop_tokens`: key -> [(tokens, val loss)]. Each curve is kept in `store` under a
    digest of what decides it (as `ground_truth` keeps its losses); a kept curve that reaches `stop_tokens` is
    cut there (a rung never depends on the rungs after it), a shorter one is run again."""
    cfg, h, curves = ctx.cfg, ctx.horizon, {}
    kept = json.loads(store.read_text()) if store.is_file() else {}
    teacher = teacher_digest(cfg)
    for i, arch in enumerate(space):
        digest = run_digest(ctx, teacher, arch, brute_run(ctx), cfg.distill.eval_sequences)
        if digest not in kept or kept[digest][-1][0] < stop_tokens:
            kept[digest] = brute_curve(ctx, arch, i, stop_tokens, work)
            write_text_atomic(store, json.dumps(kept))
        curves[arch_key(arch)] = curve = [(int(t), v) for t, v in kept[digest] if t <= max(stop_tokens, h.tokens)]
        log.info("brute force %d/%d %s: %s", i + 1, len(space), arch.describe(), [round(v, 4) for _, v in curve])
    return curves


def brute_curve(ctx, arch, i: int, stop_tokens: int, work: Path) -> list[tuple[int, float]]:
    """One candidate's brute-force curve (see `brute_force`)."""
    cfg, h = ctx.cfg, ctx.horizon
    student = prune(ctx.teacher, arch, ctx.importance, cfg.depth_strategy)
    curve, steps = rung_read(ctx, student, brute_run(ctx), work / str(i), None), h.steps
    while steps * h.tokens_per_step < stop_tokens:
        last = work / (str(i) if steps == h.steps else f"{i}-{steps}")
        read = rung_read(ctx, student, continued(ctx, steps), work / f"{i}-{2 * steps}", stable_state(last / "model"))
        steps *= 2
        curve.append((steps * h.tokens_per_step, read[-1][1]))
    shutil.rmtree(work, ignore_errors=True)
    return curve


def brute_run(ctx):
    """Brute force's first rung: the trials' KD settings, read at its end only (the trials' own reads inside the
    horizon are nas's; a read of 1,024 sequences costs more than the horizon's training on these teachers)."""
    return ctx.horizon.short_distill(ctx.cfg).replace(eval_every=0)


def teacher_digest(cfg) -> str:
    """The digest of the teacher's weight files (read once per space, not per candidate)."""
    files = sorted(Path(cfg.teacher).glob("*.safetensors"))
    return hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()


def run_digest(ctx, teacher: str, arch, run, eval_sequences: int, data_seed: int = 0) -> str:
    """A digest of what decides a candidate's distillation: the teacher's files (`teacher_digest`), the
    candidate, the KD settings, the validation sequences, the depth strategy, the seed and, when not the
    data's own, the data order's seed (each rung schedule keeps its own store files, `ground_truth-wsd.json`)."""
    cfg = ctx.cfg
    what = {"teacher": teacher, "arch": arch.to_dict(), "run": run.to_dict(),
            "eval_sequences": eval_sequences, "depth": cfg.depth_strategy, "seed": cfg.seed}  # fmt: skip
    if data_seed:  # the ground truth's seeds after the first (the first keeps the digests stored before them)
        what["data_seed"] = data_seed
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def rung_read(ctx, student, run, out: Path, state: Path | None) -> list[tuple[int, float]]:
    """One rung of one candidate as nas runs it: its curve [(tokens, val loss)], the last point the read
    (wsd: the stable phase from `state`, read after its decay branch; restart: `run` from the weights)."""
    tokens_per_step = ctx.horizon.tokens_per_step
    if ctx.cfg.search.rung_schedule == "wsd":
        stable, read = distill_and_read(ctx, student, run.replace(schedule="constant"), out, start=state)
        points = [(p["step"] * tokens_per_step, p["val_loss"]) for p in stable.curve[:-1]]
        return points + [(run.steps * tokens_per_step, read.val_loss)]
    result = distill(ctx.teacher, student, ctx.data, run, out)
    return [(p["step"] * tokens_per_step, p["val_loss"]) for p in result.curve]


def truth_run(cfg, steps: int):
    """The ground truth's one run of `steps`: the schedule the user's winner gets from start to end
    (restart: one `distill.schedule` run; wsd: warmup, stable, then the decay over the last `decay_fraction`)."""
    run = resolve(cfg).short_distill(cfg).replace(steps=steps, eval_every=0)
    return run.replace(schedule="wsd") if cfg.search.rung_schedule == "wsd" else run


def ground_truth(ctx, space, steps: int, work: Path, store: Path, sequences: int,
                 seeds: int) -> tuple[dict, dict, dict]:  # fmt: skip
    """Every candidate distilled in one run of `steps`, repeated with `seeds` data orders (seed k: the data's
    seed + k, the run's seed + k; the first is the rungs' own order): (key -> val loss, key -> per-sequence
    losses, key -> [val loss per seed]), the first two the mean over the seeds, all on `sequences` validation
    sequences (more than the rungs read, so that the judge resolves closer pairs than the judged). Each result is
    kept in `store` (JSON, rewritten atomically after every run) under a digest of what decides it (the teacher's
    files, the candidate, the KD settings, the seed), so a killed run resumes and a rerun with other search
    settings, or more seeds, reuses it."""
    cfg, truth, per_seq, by_seed = ctx.cfg, {}, {}, {}
    val = ctx.data.val(sequences)
    kept = json.loads(store.read_text()) if store.is_file() else {}
    teacher = teacher_digest(cfg)
    for i, arch in enumerate(space):
        runs = []
        for k in range(seeds):
            run, data = truth_run(cfg, steps), ctx.data
            if k:  # another data order (and torch seed) for the same candidate
                run, data = run.replace(seed=run.seed + k), replace(data, seed=data.seed + k)
            digest = run_digest(ctx, teacher, arch, run, sequences, data.seed if k else 0)
            if digest not in kept:
                student = prune(ctx.teacher, arch, ctx.importance, cfg.depth_strategy)
                distill(ctx.teacher, student, data, run, work / f"{i}-seed{k}")
                shutil.rmtree(work, ignore_errors=True)
                losses = sequence_losses(student, val, cfg.distill.eval_batch_size)
                kept[digest] = {"loss": float(np.mean(losses)), "per_seq": losses}
                write_text_atomic(store, json.dumps(kept))
            runs.append(kept[digest])
        key = arch_key(arch)
        by_seed[key] = [r["loss"] for r in runs]
        truth[key] = float(np.mean(by_seed[key]))
        per_seq[key] = np.mean([r["per_seq"] for r in runs], axis=0).tolist()
        log.info("ground truth %d/%d %s: %.4f (seeds %s)", i + 1, len(space), arch.describe(), truth[key],
                 " ".join(f"{v:.4f}" for v in by_seed[key]))  # fmt: skip
    return truth, per_seq, by_seed


def tau(scores: dict, truth: dict) -> float:
    keys = [k for k in truth if k in scores]
    if len(keys) < 2:
        return float("nan")
    return float(stats.kendalltau([scores[k] for k in keys], [truth[k] for k in keys]).statistic)


def nas_pick(study, budget: str) -> tuple[tuple, dict]:
    """(the key of nas's pick, its horizon record) for `budget`."""
    horizon = (StudyRecord.read(study).horizon or {}).get(budget, {})
    trial = study.trials[horizon["pick"]]
    return arch_key(TrialRecord.read(trial).arch), horizon


def finalist_scores(study, horizon: dict) -> dict:
    """nas's ranking of its finalists (the last rung): candidate key -> the loss it ranks by."""
    last = horizon["rungs"][-1]
    key = {n: arch_key(TrialRecord.read(study.trials[int(n)]).arch) for n in last["losses"]}
    scores = last["predicted"] if study.user_attrs["config"]["search"]["extrapolate"] else last["losses"]
    return {key[n]: v for n, v in scores.items()}


def seed_noise(by_seed: dict | None) -> float:
    """The standard error, from the ground truth's seeds, of a pair's gap averaged over them: the variance of a
    pair's gap across the seeds pooled over every pair of the space (two seeds give a pair one degree of
    freedom, too few alone), over the number of seeds; 0 with one seed (the bootstrap over the validation
    sequences, `ranking.margin_noise`, sees only the read's noise, not the training run's)."""
    keys = list(by_seed or {})
    n = len(by_seed[keys[0]]) if keys else 0
    if n < 2 or len(keys) < 2:
        return 0.0
    var = [np.var(np.subtract(by_seed[a], by_seed[b]), ddof=1) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    return float(np.sqrt(np.mean(var) / n))


def resolved_pairs(truth: dict, per_seq: dict, by_seed: dict | None = None) -> list[tuple]:
    """The pairs of candidates the ground truth itself resolves: their loss gap is beyond 2 standard errors, the
    read's (a paired bootstrap over its validation sequences) and the training run's (`seed_noise`) together,
    and, with seeds, every seed orders them alike. Computed once per space: each pair's bootstrap is the cost."""
    train, keys = seed_noise(by_seed), list(truth)

    def resolved(a, b) -> bool:
        if by_seed and len({np.sign(x - y) for x, y in zip(by_seed[a], by_seed[b], strict=True)}) > 1:
            return False  # the seeds disagree on the order
        noise = float(np.hypot(ranking.margin_noise(per_seq[a], per_seq[b]), train))
        return abs(truth[a] - truth[b]) > ranking.NOISE_Z * noise

    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if resolved(a, b)]


def resolved_tau(scores: dict, truth: dict, pairs: list[tuple]) -> float:
    """Kendall tau vs the ground truth over its resolved `pairs` (`resolved_pairs`) that `scores` ranks; nan
    when there is none."""
    signs = [np.sign((truth[a] - truth[b]) * (scores[a] - scores[b])) for a, b in pairs if a in scores and b in scores]
    return float(np.mean(signs)) if signs else float("nan")


def seed_tau(by_seed: dict) -> float:
    """Kendall tau between the ground truth's first two seeds over every candidate (how far one long run
    repeats itself); nan with one seed or one candidate."""
    runs = list(zip(*by_seed.values(), strict=True))  # runs[k]: every candidate's loss on seed k
    if len(runs) < 2:
        return float("nan")
    return tau(dict(zip(by_seed, runs[0], strict=True)), dict(zip(by_seed, runs[1], strict=True)))


def truth_line(truth: dict, per_seq: dict, by_seed: dict) -> str:
    """The ground truth's best, spread and top-1 margin against its noise (the read's and the seeds', see
    `resolved_pairs`; a space of one: no margin)."""
    ranked = sorted(truth, key=truth.get)
    best = truth[ranked[0]]
    if len(ranked) < 2:
        return f"ground truth: {best:.4f}, the space's one candidate"
    read, train = ranking.margin_noise(per_seq[ranked[0]], per_seq[ranked[1]]), seed_noise(by_seed)
    noise = float(np.hypot(read, train))
    worse = sum(truth[k] - best > ranking.NOISE_Z * noise for k in ranked)
    seeds = len(next(iter(by_seed.values())))
    return (f"ground truth: best {best:.4f}, spread {truth[ranked[-1]] - best:.4f} nats, top-1 margin "
            f"{truth[ranked[1]] - best:.4f} (noise of that margin {noise:.4f}: the read's {read:.4f}, the seeds' "
            f"{train:.4f} over {seeds}); {worse} of {len(ranked)} candidates worse than the best beyond 2x noise; "
            f"Kendall tau between two seeds {seed_tau(by_seed):.2f}")  # fmt: skip


def brute_tokens(study, candidates: int, stop: int, horizon: int) -> int:
    """KD tokens of every candidate to `stop` through the rungs, wsd's decay branch after each rung too."""
    search, decay = study.user_attrs["config"]["search"], study.user_attrs["config"]["distill"]["decay_fraction"]
    rungs = [horizon * 2**k for k in range(32) if horizon * 2**k <= stop]
    reads = decay * sum(rungs) if search.get("rung_schedule") == "wsd" else 0
    return round(candidates * (stop + reads))


def report_budget(budget, space, studies, screen_loss, curves, truth, per_seq, by_seed, horizon_tokens) -> dict:
    """Print one budget's table; returns its regrets (for the summary over budgets)."""
    best = min(truth.values())
    print(f"\n== budget {budget}: {len(space)} candidates, depths {sorted({a.num_layers for a in space})}")
    print(truth_line(truth, per_seq, by_seed))
    nearest = sorted(space, key=lambda a: -count_params(a))[:MODELOPT_TOP_K]
    rows, regrets, judged = [], {}, resolved_pairs(truth, per_seq, by_seed)
    zero_shot = min(screen_loss, key=screen_loss.get)
    modelopt = min((arch_key(a) for a in nearest), key=screen_loss.get)
    largest = arch_key(max(space, key=count_params))
    own_brute, facts = {}, {}  # per study: brute force at its own stop; nas's Done-when figures
    for name, study in studies.items():
        pick, horizon = nas_pick(study, budget)
        finalists = tau(finalist_scores(study, horizon), truth)
        resolved = resolved_tau(finalist_scores(study, horizon), truth, judged)
        own_brute[name] = brute_tokens(study, len(space), horizon["rungs"][-1]["tokens"], horizon_tokens)
        facts.setdefault(name, {"tau": finalists, "resolved": resolved,
                                "ratio": study_tokens(study, budget) / own_brute[name]})  # fmt: skip
        rows.append((name, pick, study_tokens(study, budget),
                     f"stopped at {horizon['rungs'][-1]['tokens'] / horizon_tokens:.0f}x horizon ({horizon['stop']}"
                     f"{'; small space: every candidate to the horizon' if horizon.get('small_space') else ''}), "
                     f"finalists' tau {finalists:.2f} ({resolved:.2f} over the pairs the ground truth resolves)"))  # fmt: skip
    stop = max(nas_pick(s, budget)[1]["rungs"][-1]["tokens"] for s in studies.values())
    at_stop = {k: next((v for t, v in c if t >= stop), c[-1][1]) for k, c in curves.items()}
    rows += [("zero-shot pick (ModelOpt)", zero_shot, 0, "screen only"),
             ("ModelOpt's rule (nearest, best zero-shot)", modelopt, 0,
              f"screen only, best of the {len(nearest)} nearest"),
             ("largest candidate", largest, 0, "no search"),
             ("every candidate to where nas stopped", min(at_stop, key=at_stop.get),
              brute_tokens(studies["nas"], len(space), stop, horizon_tokens),
              f"brute force, {stop / horizon_tokens:.0f}x horizon")]  # fmt: skip
    print(f"{'method':<48} {'regret':>8} {'tokens':>12} {'of brute':>9}  notes (of brute: at the method's own stop)")
    for name, pick, tokens, note in rows:
        regrets[name] = truth[pick] - best
        print(f"{name:<48} {truth[pick] - best:8.4f} {tokens:12,} {tokens / own_brute.get(name, rows[-1][2]):9.3f}  "
              f"{note}")  # fmt: skip
    rungs = sorted({t for c in curves.values() for t, _ in c})
    at_rung = {f"{t / horizon_tokens:g}x": {k: dict(c)[t] for k, c in curves.items()} for t in rungs}
    by_rung = {x: tau(scores, truth) for x, scores in at_rung.items()}
    resolved_by_rung = {x: resolved_tau(scores, truth, judged) for x, scores in at_rung.items()}
    taus = [f"{x} {v:.2f}" for x, v in by_rung.items()]
    final = studies["nas"].user_attrs["final_tokens"]

    def extrapolated(upto: int) -> float:  # each curve's power law fitted up to `upto` tokens, at the final tokens
        seen = {k: [(t, v) for t, v in c if t <= upto] for k, c in curves.items()}
        return tau({k: ranking.predict(ranking.fit_curve(*zip(*c, strict=True)), final, c[-1][1])
                    for k, c in seen.items()}, truth)  # fmt: skip

    print(f"Kendall tau vs ground truth, every candidate: screen {tau(screen_loss, truth):.2f}; at the rungs "
          f"(x horizon) {', '.join(taus)}; extrapolated to the ground truth's tokens {extrapolated(rungs[-1]):.2f}")  # fmt: skip
    pairs = len(judged)
    print(f"  over the {pairs} of {len(truth) * (len(truth) - 1) // 2} pairs the ground truth resolves: screen "
          f"{resolved_tau(screen_loss, truth, judged):.2f}; "
          + ", ".join(f"{x} {v:.2f}" for x, v in resolved_by_rung.items()))  # fmt: skip
    print("  extrapolated from the curve up to each rung: "
          + ", ".join(f"{t / horizon_tokens:g}x {extrapolated(t):.2f}" for t in rungs[2:]))  # fmt: skip
    curve = {"curve.screen": tau(screen_loss, truth)} | {f"curve.{x}": v for x, v in by_rung.items()}
    curve |= {"resolved.screen": resolved_tau(screen_loss, truth, judged), "resolved.pairs": pairs,
              "truth.seeds": len(next(iter(by_seed.values()))), "truth.seed_noise": seed_noise(by_seed),
              "truth.seed_tau": seed_tau(by_seed)}  # fmt: skip
    curve |= {f"resolved.{x}": v for x, v in resolved_by_rung.items()}
    return regrets | {f"{k}.{f}": v for k, fs in facts.items() for f, v in fs.items()} | curve


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".nas_cache/search_quality")
    p.add_argument("--smoke", action="store_true", help="a tiny teacher and horizon (seconds, for the test)")
    p.add_argument("--teacher", choices=tuple(TEACHERS), default="deep",
                   help="the teacher's shape and model type (all trained on the same text; see TEACHERS)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--budgets", help="comma-separated (default 30%%; --smoke: 50%%,95%%)")
    p.add_argument("--tolerance", type=float, default=0.025)
    p.add_argument("--step", type=int, default=32, help="step of hidden_size (ffn_hidden_size: twice it)")
    p.add_argument("--horizon", type=int, default=30, help="search horizon in steps of batch x seq_len tokens")
    p.add_argument("--truth-factor", type=int, default=10, help="ground truth = this many horizons")
    p.add_argument("--batch-size", type=int, default=2)
    # 1,024 x 32 tokens: a rung read on 32,768 tokens, what nas's defaults read (64 sequences of data.seq_len 512;
    # at seq_len 4096, 262,144); the ground truth on 2,048 (of the 2,156 the KJV's validation split holds) and 2
    # seeds. On the hybrid teacher at 25%, tau vs the ground truth over the pairs it resolves at 1x / 2x / 4x / 8x:
    # reads on 32, 0.69 / 0.56 / 0.25 (commit 7bb4389); on 128 (the ground truth on 256, one seed), 0.88 / 0.81 /
    # 0.81 / 1.00 (05b86dc); on 1,024 (2,048, two seeds), 0.81 / 0.94 / 1.00 / 1.00 (benchmarks/README.md, "Four
    # teachers")
    p.add_argument("--eval-sequences", type=int, default=1024, help="validation sequences of nas's trials and rungs")
    p.add_argument("--truth-sequences", type=int, default=2048,
                   help="validation sequences of the ground truth (more than the rungs: a finer judge)")
    # 2 seeds: the standard error of a pair's mean gap over two data orders is 0.0004-0.0013 nats on 2,048
    # sequences, above the read's bootstrap noise (0.0002-0.0012) in 8 of 10 budgets; one run alone "resolved"
    # pairs a second run swaps (the two seeds' tau 0.60-1.00; benchmarks/README.md, "Four teachers")
    p.add_argument("--truth-seeds", type=int, default=2,
                   help="the ground truth's runs per candidate, each with its own data order (its noise: their spread)")
    p.add_argument("--exhaustive", action="store_true", help="also nas with the halving over every candidate")
    p.add_argument("--rung-schedule", choices=("restart", "wsd"), default=None,
                   help="search.rung_schedule of nas, brute force and the ground truth (default: nas's default)")
    p.add_argument("--brute-factor", type=int, default=0,
                   help="brute force's rungs go at least this many horizons (the tau curve; default: where nas stopped)")
    p.add_argument("--json", help="also write the per-budget figures (taus per rung, regrets, tokens) here")
    args = p.parse_args()
    if args.truth_seeds < 1:
        p.exit(2, f"search_quality: --truth-seeds must be at least 1, got {args.truth_seeds}\n")
    args.budgets = args.budgets or ("" if args.smoke else "30%")
    if args.smoke:
        # budgets of 2 candidates and of 1, fewer than ModelOpt's 10: no row or summary may depend on the count
        args.budgets = args.budgets or "50%,95%"
        args.horizon, args.truth_factor, args.eval_sequences, args.truth_sequences, args.step = 4, 3, 16, 32, 16
        args.tolerance, args.seq_len = 0.06, 16
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("nas.search.horizon").setLevel(logging.INFO)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # the deep teacher keeps the directory it always had ("full"), so its cached teacher and ground truth stay
    size = ("smoke" if args.smoke else "full") + ("" if args.teacher == "deep" else f"-{args.teacher}")
    out, start = Path(args.out) / size, time.perf_counter()
    spec = smoke_teacher(TEACHERS[args.teacher]) if args.smoke else TEACHERS[args.teacher]
    print("run at: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    info, data_cfg = teacher_and_data(out, args.seq_len, spec)
    print(f"teacher {args.teacher} ({spec.model_type}): {info.params:,} params, {spec.num_layers} layers, val loss {info.val_loss:.3f} "
          f"(unigram {info.unigram_loss:.3f})")  # fmt: skip
    studies, seconds = {}, {}
    variants = [("nas", "auto")] + [("nas, halving over all (exhaustive)", "exhaustive")] * args.exhaustive
    schedule = args.rung_schedule or SearchConfig().rung_schedule
    args.rung_schedule, tag = schedule, "" if schedule == "restart" else f"-{schedule}"  # restart: the older names
    for name, sampler in variants:
        slug = "study-" + sampler + tag
        shutil.rmtree(out / slug, ignore_errors=True)
        t0 = time.perf_counter()
        ctx, studies[name] = search(run_config_from_dict(study_config(out, data_cfg, args, slug, sampler)))
        seconds[name] = time.perf_counter() - t0
    cfg, h = ctx.cfg, ctx.horizon
    truth_steps = args.truth_factor * h.steps
    print(f"horizon {h.tokens:,} tokens ({h.steps} steps of {h.tokens_per_step} tokens), ground "
          f"truth {truth_steps * h.tokens_per_step:,} tokens ({truth_steps} steps, {args.truth_factor}x), "
          f"{cfg.distill.eval_sequences} validation sequences (the ground truth: {args.truth_sequences})")  # fmt: skip
    print(schedules(cfg, truth_steps))
    summary = []
    for budget in cfg.budgets:
        space = enumerate_candidates(ctx.teacher_arch, budget, cfg.space)
        screen_loss = {arch_key(s["arch"]): s["loss"] for s in studies["nas"].user_attrs["screen"]
                       if s["budget"] == budget and s["loss"] is not None}  # fmt: skip
        stop = max(nas_pick(s, budget)[1]["rungs"][-1]["tokens"] for s in studies.values())
        stop = max(stop, args.brute_factor * h.tokens)
        t0 = time.perf_counter()
        curves = brute_force(ctx, space, stop, out / f"work{tag}", out / f"brute_force{tag}.json")
        seconds[f"brute force {budget}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        truth, per_seq, by_seed = ground_truth(ctx, space, truth_steps, out / f"work{tag}",
                                               out / f"ground_truth{tag}.json", args.truth_sequences, args.truth_seeds)
        seconds[f"ground truth {budget}"] = time.perf_counter() - t0
        summary.append(report_budget(budget, space, studies, screen_loss, curves, truth, per_seq, by_seed, h.tokens))
    print(f"\nover {len(summary)} budgets (regret in nats, vs nas):")
    for name in (k for k in summary[0] if "." not in k):
        worse = [r[name] - r["nas"] for r in summary]
        print(f"  {name:<48} worse than nas in {sum(w > 1e-9 for w in worse)} of {len(worse)}, "
              f"by {np.mean(worse):+.4f} on average (max regret {max(r[name] for r in summary):.4f})")  # fmt: skip
    for name in studies:  # the issue's goals: finalists' tau >= 0.9, regret <= 0.01, <= 1/3 of brute force
        rows = [(r[f"{name}.tau"], r[name], r[f"{name}.ratio"]) for r in summary]
        resolved = [r[f"{name}.resolved"] for r in summary]
        print(f"{name}: finalists' tau >= 0.9 in {sum(t >= 0.9 for t, _, _ in rows)} of {len(rows)} budgets (min "
              f"{min(t for t, _, _ in rows):.2f}; over the pairs the ground truth resolves: >= 0.9 in "
              f"{sum(t >= 0.9 for t in resolved if t == t)} of {sum(t == t for t in resolved)}); regret <= 0.01 in "
              f"{sum(g <= 0.01 for _, g, _ in rows)} (max "
              f"{max(g for _, g, _ in rows):.4f}); <= 1/3 of brute force's tokens in "
              f"{sum(x <= 1 / 3 for _, _, x in rows)} (max {max(x for _, _, x in rows):.3f})")  # fmt: skip
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
          + f", total {time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.json:
        figures = {"args": vars(args), "schedules": schedules(cfg, truth_steps), "seconds": seconds,
                   "budgets": dict(zip(cfg.budgets, summary, strict=True))}  # fmt: skip
        write_text_atomic(Path(args.json), json.dumps(figures, indent=1, default=str) + "\n")


def schedules(cfg, truth_steps: int) -> str:
    """Which schedule the trials and rungs, the ground truth and the final distillation use."""
    truth, final = truth_run(cfg, truth_steps), cfg.final_distill()
    if cfg.search.rung_schedule == "wsd":
        return (f"schedules: trials and rungs wsd (stable at lr {cfg.distill.lr:g}, each read after a decay of "
                f"{cfg.distill.decay_fraction:g}x its tokens, the next rung resuming the stable state); ground truth "
                f"one wsd run of {truth.steps} steps (decay over the last {truth.decay_fraction:g}); final "
                "distillation the winner's stable phase resumed, then wsd's decay")  # fmt: skip
    trial = resolve(cfg).short_distill(cfg)
    return (f"schedules: trials {trial.schedule}, each rung a fresh {trial.schedule} "
            f"schedule from the last weights (restart); ground truth one {truth.schedule} run of {truth.steps} "
            f"steps; final distillation a fresh {final.schedule} schedule from the pick's weights")  # fmt: skip


if __name__ == "__main__":
    main()
