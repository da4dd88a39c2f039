"""Which Mamba-head score picks the heads to keep better: nas's (the `out_proj` input) or ModelOpt's (the `x`
part of `in_proj`'s output)? Both against a ground truth that can disagree with both, on one teacher trained
on real text.

Teacher: `search_quality`'s "hybrid" (a 12-layer Nemotron-H: 6 Mamba2 layers of 8 heads x 32 in 2 groups, 2
attention, 4 squared-ReLU MLPs) trained by the demo recipe (`benchmarks.common.demo_teacher_and_data`); with
the same `--out` and `--seq-len` as `search_quality --teacher hybrid` it is the same cached teacher (reused).
Side by side, from the same calibration sequences:
- nas's score (`nas.prune.importance.compute_importance`'s `mamba_heads`, see `nas.prune.activations`): per
  token the L2 norm of the head's slice of the `out_proj` input (the scan's output after the gated RMSNorm),
  mean over the sequence, L2 over the batch;
- ModelOpt's score, as `_register_mamba_mixer_importance` in NVIDIA Model-Optimizer's
  `modelopt/torch/prune/plugins/mcore_minitron.py` (read at commit a2fbac7 of 2026-08-21) defines it: a
  forward hook on `in_proj` takes its output (before the causal conv and its activation; Megatron's `in_proj`
  output is [z, x, B, C, dt], HF's `NemotronHMamba2Mixer` splits it the same way: [gate z, x B C (the conv
  input), dt]), per channel |output| mean over the sequence, squared and summed over the batch, square root
  (`_mamba_in_proj_forward_hook`); then the `x` part (channels d_inner..2 d_inner) per head, the L2 norm over
  the head's channels (at the full head_dim, which is kept here), ranked within each group
  (`_estimate_head_and_head_dim_rankings`; nas's cut also keeps heads evenly within each group);
- the ground truth: each head's ablation loss, the teacher's validation LM loss with that one head's output
  zeroed (its slice of the `out_proj` input, a forward pre-hook), minus the teacher's own.
Printed: per Mamba layer Kendall tau of each score vs the ablation ranking (and over the head pairs whose
ablation losses differ beyond 2 bootstrap standard errors); then the decision itself: only the Mamba heads
cut (keep 6 and 4 of 8 per layer, all else whole) by nas's score, ModelOpt's, the ablation itself (an oracle
of single-head effects), and random heads (`--seeds` seeds, mean), each measured zero-shot and after the
same short KD as `search_quality`'s trials (30 steps of 2 x 32 tokens, lr 1e-3 -> 1e-4 cosine); the after-KD
loss is the mean of `--kd-repeats` runs from the same cut on successive batches (one run's loss moves with its
batches by about as much as the scores differ).

    OMP_NUM_THREADS=1 python -m benchmarks.mamba_head_score [--smoke] [--out .nas_cache/search_quality] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from benchmarks.common import demo_teacher_and_data  # noqa: E402
from benchmarks.search_quality import TEACHERS, resolved_pairs, resolved_tau, smoke_teacher, tau  # noqa: E402
from nas.evaluate.loss import sequence_losses  # noqa: E402
from nas.io import write_text_atomic  # noqa: E402
from nas.model.arch import Arch  # noqa: E402
from nas.prune.cut import prune  # noqa: E402
from nas.prune.importance import compute_importance  # noqa: E402
from nas.search import ranking  # noqa: E402
from nas.settings import DistillConfig  # noqa: E402
from nas.train.loop import distill  # noqa: E402

# search_quality's study: importance on 64 calibration sequences in batches of 16 (its layer-removal losses on 16
# validation sequences); its trials: 30 steps of batch 2, lr 1e-3 decaying to 1e-4 (`study_config`)
CALIB, IMPORTANCE_VAL, CALIB_BATCH = 64, 16, 16
KD = {"steps": 30, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-4, "eval_sequences": 32}
EVAL_BATCH = 32  # sequences per validation forward (speed only)


def mamba_mixers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> the Mamba2 mixer of each Mamba layer of a Nemotron-H."""
    return {i: layer.mixer for i, layer in enumerate(model.model.layers) if hasattr(layer.mixer, "conv1d")}


@torch.no_grad()
def modelopt_mamba_heads(model, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """ModelOpt's Mamba-head scores [num_layers, num_mamba_heads] (rows of other layers 0; see the docstring)."""
    mixers, config = mamba_mixers(model), model.config
    heads, head_dim = config.mamba_num_heads, config.mamba_head_dim
    inner = heads * head_dim
    sums = {i: torch.zeros(inner, dtype=torch.float64) for i in mixers}

    def hook(i):
        def on_in_proj(module, args, output):  # output [batch, seq, z | x B C | dt]; ModelOpt's is [seq, batch, ...]
            x = output[..., inner : 2 * inner].float()
            sums[i] += x.abs().mean(dim=1).pow(2).sum(dim=0).double().cpu()

        return on_in_proj

    handles = [m.in_proj.register_forward_hook(hook(i)) for i, m in mixers.items()]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(calib), batch_size):
            model(input_ids=calib[start : start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    scores = torch.zeros(config.num_hidden_layers, heads)
    for i, s in sums.items():
        scores[i] = s.sqrt().view(heads, head_dim).norm(dim=1).float()
    return scores


def ablation_losses(model, val: torch.Tensor) -> tuple[list[float], dict[tuple[int, int], list[float]]]:
    """(the teacher's per-sequence val losses, (layer, head) -> its per-sequence losses with that Mamba head's
    output zeroed: its slice of the `out_proj` input)."""
    head_dim, out = model.config.mamba_head_dim, {}
    for i, mixer in mamba_mixers(model).items():
        for h in range(model.config.mamba_num_heads):

            def zero(module, args, h=h):
                x = args[0].clone()
                x[..., h * head_dim : (h + 1) * head_dim] = 0
                return (x, *args[1:])

            handle = mixer.out_proj.register_forward_pre_hook(zero)
            try:
                out[i, h] = sequence_losses(model, val, EVAL_BATCH)
            finally:
                handle.remove()
    return sequence_losses(model, val, EVAL_BATCH), out


def layer_taus(scores: dict[str, torch.Tensor], base: list[float], ablated: dict) -> dict[str, dict]:
    """Per Mamba layer and score: Kendall tau vs the ablation loss increase, over every head pair and over the
    pairs whose ablation losses differ beyond `ranking.NOISE_Z` paired-bootstrap standard errors (search_quality's
    `tau` and `resolved_tau`, the ablation as the ground truth)."""
    out = {name: {} for name in scores}
    for layer in sorted({i for i, _ in ablated}):
        heads = sorted(h for i, h in ablated if i == layer)
        per_seq = {h: ablated[layer, h] for h in heads}
        delta = {h: float(np.mean(per_seq[h]) - np.mean(base)) for h in heads}
        pairs = resolved_pairs(delta, per_seq)
        for name, s in scores.items():
            row = {h: float(s[layer, h]) for h in heads}
            out[name][layer] = {"tau": tau(row, delta), "resolved": resolved_tau(row, delta, pairs), "pairs": len(pairs)}
    return out


def cut_and_distill(teacher, data, keep: int, importance, val: torch.Tensor, run: DistillConfig, work: Path,
                    repeats: int) -> dict:  # fmt: skip
    """Only the Mamba heads cut to `keep` per layer by `importance`: the kept heads, the val loss zero-shot and
    after `run`'s KD, the mean of `repeats` runs from the same cut on successive batches (`data_offset`; the
    per-sequence mean too, for the noise of a difference)."""
    arch = Arch.from_hf_config(teacher.config).replace(num_mamba_heads=keep)
    student = prune(teacher, arch, importance)
    kept = {i: list(h) for i, h in enumerate(student.nas_cut.mamba_heads) if h}
    zero_shot = sequence_losses(student, val, EVAL_BATCH)
    after = []
    for r in range(repeats):
        trained = copy.deepcopy(student)
        distill(teacher, trained, data, run.replace(data_offset=r * run.steps), work / str(r), write=False)
        after.append(sequence_losses(trained, val, EVAL_BATCH))
    per_seq = np.mean(after, axis=0).tolist()
    return {"kept": kept, "zero_shot": float(np.mean(zero_shot)), "after_kd": float(np.mean(per_seq)),
            "after_kd_runs": [float(np.mean(a)) for a in after], "per_seq": per_seq}  # fmt: skip


def importances(teacher, data, args) -> tuple[dict, tuple, dict]:
    """The importance object of each ranking (nas's, ModelOpt's, the ablation oracle's, each random seed's:
    nas's with `mamba_heads` replaced), the ablation figures, and the seconds each score took."""
    calib = data.calib(args.calib_sequences)
    t0 = time.perf_counter()
    nas = compute_importance(teacher, calib, data.val(IMPORTANCE_VAL), CALIB_BATCH)
    t1 = time.perf_counter()
    modelopt = modelopt_mamba_heads(teacher, calib, CALIB_BATCH)
    t2 = time.perf_counter()
    base, ablated = ablation_losses(teacher, data.val(args.eval_sequences))
    oracle = torch.zeros_like(nas.mamba_heads)
    for (i, h), losses in ablated.items():
        oracle[i, h] = float(np.mean(losses) - np.mean(base))
    seconds = {"nas score": t1 - t0, "ModelOpt score": t2 - t1, "ablation": time.perf_counter() - t2}
    rankings = {"nas (out_proj input)": nas, "ModelOpt (in_proj x)": dataclasses.replace(nas, mamba_heads=modelopt),
                "ablation (oracle)": dataclasses.replace(nas, mamba_heads=oracle)}  # fmt: skip
    for seed in range(args.seeds):
        noise = torch.rand(nas.mamba_heads.shape, generator=torch.Generator().manual_seed(seed))
        rankings[f"random seed {seed}"] = dataclasses.replace(nas, mamba_heads=noise)
    return rankings, (base, ablated), seconds


def print_taus(taus: dict[str, dict]) -> dict[str, float]:
    """The per-layer taus, and each score's mean over the layers (returned)."""
    layers = sorted(next(iter(taus.values())))
    print("\nKendall tau vs the ablation ranking per Mamba layer (in brackets: over the head pairs whose ablation "
          "losses differ beyond 2 bootstrap standard errors)")  # fmt: skip
    first = next(iter(taus.values()))
    print(f"{'score':<24}" + "".join(f"  layer {i} ({first[i]['pairs']} pairs)".rjust(22) for i in layers) + "  mean")
    means = {}
    for name, by_layer in taus.items():
        means[name] = float(np.mean([by_layer[i]["tau"] for i in layers]))
        resolved = np.nanmean([by_layer[i]["resolved"] for i in layers]) if any(
            by_layer[i]["pairs"] for i in layers) else float("nan")  # fmt: skip
        cells = "".join(f"{by_layer[i]['tau']:+.2f} ({by_layer[i]['resolved']:+.2f})".rjust(22) for i in layers)
        print(f"{name:<24}{cells}  {means[name]:+.2f} ({resolved:+.2f})")
    return means


def print_table(rows: dict[tuple[str, int], dict], seeds: int, heads: int) -> dict:
    """The decision table: each score and keep, zero-shot and after-KD loss (random: the mean over seeds)."""
    print(f"{'score':<24} {'keep':>6} {'zero-shot loss':>15} {'after-KD loss':>14}  notes")
    table = {}
    for keep in sorted({k for _, k in rows}, reverse=True):
        random = [rows[f"random seed {s}", keep] for s in range(seeds)]
        table[f"random (mean of {seeds}), {keep}"] = {
            "zero_shot": float(np.mean([r["zero_shot"] for r in random])),
            "after_kd": float(np.mean([r["after_kd"] for r in random])),
            "seeds": [{k: r[k] for k in ("zero_shot", "after_kd", "after_kd_runs", "kept")} for r in random]}  # fmt: skip
        nas, modelopt = rows["nas (out_proj input)", keep], rows["ModelOpt (in_proj x)", keep]
        same = sum(nas["kept"][i] == modelopt["kept"][i] for i in nas["kept"])
        noise = ranking.margin_noise(nas["per_seq"], modelopt["per_seq"])
        runs = ", ".join(f"{m - n:+.4f}" for m, n in zip(modelopt["after_kd_runs"], nas["after_kd_runs"], strict=True))
        notes = {"nas (out_proj input)": f"same kept heads as ModelOpt in {same} of {len(nas['kept'])} Mamba layers",
                 "ModelOpt (in_proj x)": f"after KD minus nas's {modelopt['after_kd'] - nas['after_kd']:+.4f} "
                                         f"(per KD run {runs}; bootstrap noise of the mean's {noise:.4f})"}  # fmt: skip
        for name in [*(n for n, k in rows if k == keep and not n.startswith("random"))]:
            table[f"{name}, {keep}"] = {k: rows[name, keep][k] for k in ("zero_shot", "after_kd", "after_kd_runs", "kept")}
            r = rows[name, keep]
            print(f"{name:<24} {keep:>3}/{heads} {r['zero_shot']:15.4f} {r['after_kd']:14.4f}  {notes.get(name, '')}")
        spread = f"after KD {min(r['after_kd'] for r in random):.4f}..{max(r['after_kd'] for r in random):.4f}"
        r = table[f"random (mean of {seeds}), {keep}"]
        print(f"{f'random (mean of {seeds})':<24} {keep:>3}/{heads} {r['zero_shot']:15.4f} {r['after_kd']:14.4f}  "
              f"{spread}")  # fmt: skip
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".nas_cache/search_quality",
                   help="search_quality's --out: the hybrid teacher is cached (and reused) under OUT/full-hybrid")
    p.add_argument("--seq-len", type=int, default=32, help="as search_quality's (the cached teacher's key)")
    p.add_argument("--calib-sequences", type=int, default=CALIB, help="calibration sequences of both scores")
    p.add_argument("--eval-sequences", type=int, default=256,
                   help="validation sequences of the ablation and of every loss in the table")
    p.add_argument("--keep", default="6,4", help="Mamba heads kept per layer (of 8), comma-separated")
    p.add_argument("--kd-steps", type=int, default=KD["steps"], help="steps of the short KD")
    p.add_argument("--kd-repeats", type=int, default=3,
                   help="KD runs of each cut on successive batches, their after-KD losses averaged")
    p.add_argument("--seeds", type=int, default=3, help="random-heads baselines")
    p.add_argument("--json", help="also write the figures here")
    return smoke.parse(p, argv, seq_len=16, calib_sequences=8, eval_sequences=8, kd_steps=2, seeds=2, kd_repeats=2)


def run(args, out: Path, spec) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    _, data, info, _ = demo_teacher_and_data(out, spec, args.seq_len, eval_sequences=32)
    teacher = AutoModelForCausalLM.from_pretrained(info.path).eval()
    print(f"teacher {info.path}: {info.params:,} params, {len(mamba_mixers(teacher))} Mamba layers of "
          f"{teacher.config.mamba_num_heads} heads x {teacher.config.mamba_head_dim} in {teacher.config.n_groups} "
          f"groups, val loss {info.val_loss:.3f} (unigram {info.unigram_loss:.3f})")  # fmt: skip
    rankings, (base, ablated), seconds = importances(teacher, data, args)
    deltas = [np.mean(v) - np.mean(base) for v in ablated.values()]
    print(f"ablation on {args.eval_sequences} validation sequences: teacher {np.mean(base):.4f}, one head zeroed "
          f"+{min(deltas):.4f}..+{max(deltas):.4f} nats")  # fmt: skip
    scores = {name: rankings[name].mamba_heads for name in ("nas (out_proj input)", "ModelOpt (in_proj x)")}
    taus = layer_taus(scores, base, ablated)
    means = print_taus(taus)
    val = data.val(args.eval_sequences)
    kd = DistillConfig(**(KD | {"steps": args.kd_steps}), eval_every=0, checkpoint_every=0)
    print(f"\nKD of each cut: {kd.steps} steps of {kd.batch_size} x {args.seq_len} tokens, lr {kd.lr:g} -> "
          f"{kd.min_lr:g} {kd.schedule}, {args.kd_repeats} runs on successive batches (after-KD loss: their mean); "
          f"losses on {args.eval_sequences} validation sequences")  # fmt: skip
    rows, t0 = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for keep in (int(k) for k in args.keep.split(",")):
            for n, (name, importance) in enumerate(rankings.items()):
                rows[name, keep] = cut_and_distill(teacher, data, keep, importance, val, kd, Path(work) / f"{keep}-{n}",
                                                   args.kd_repeats)
    seconds["cuts and KD"] = time.perf_counter() - t0
    table = print_table(rows, args.seeds, teacher.config.mamba_num_heads)
    seconds["total"] = time.perf_counter() - start
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return {"args": vars(args), "teacher": {"path": info.path, "params": info.params, "val_loss": info.val_loss},
            "taus": taus, "mean_tau": means, "table": table, "seconds": seconds,
            "ablation": {f"{i}.{h}": float(np.mean(v) - np.mean(base)) for (i, h), v in ablated.items()},
            "scores": {name: s.tolist() for name, s in scores.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print("run at: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    if args.smoke:  # its own tiny hybrid teacher, trained in a temporary directory
        with tempfile.TemporaryDirectory() as tmp:
            figures = run(args, Path(tmp), smoke_teacher(TEACHERS["hybrid"]))
    else:  # search_quality's directory of the hybrid teacher ("full-hybrid"), so that its teacher is reused
        figures = run(args, Path(args.out) / "full-hybrid", TEACHERS["hybrid"])
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(figures, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
