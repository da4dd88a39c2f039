"""How long the HTML report of a 50-trial study takes, and how big the file is.

The study is real: real Optuna + SQLite, candidates enumerated from a tiny teacher's space, each
trial a tiny student trained for a few steps on random tokens with its validation loss reported
(about a third pruned by successive halving, one failed, one still running).

    python -m benchmarks.report_speed [--trials 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.evaluate.loss import lm_loss
from nas.model.arch import Arch
from nas.model.size import count_params, kv_cache_bytes
from nas.prune.importance import compute_importance
from nas.prune.space import enumerate_candidates
from nas.report.frames import load_study, report_frames
from nas.report.html import write_report
from nas.search.study import ranking_stability
from nas.search.trial import measure_latency
from nas.settings import SpaceConfig
from nas.testing import tiny_model

TEACHER = dict(
    vocab_size=128,
    hidden_size=128,
    ffn_hidden_size=256,
    num_layers=8,
    num_attention_heads=8,
    num_query_groups=4,
)
STEPS, EVAL_EVERY, BATCH, SEQ = 8, 2, 4, 32


def objective(trial: optuna.Trial, candidates: list[Arch], train: torch.Tensor, val: torch.Tensor) -> float:
    arch = candidates[trial.number % len(candidates)]
    sizes = {
        k: getattr(arch, k)
        for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
    }
    for knob, value in sizes.items():
        trial.suggest_int(knob, value, value)
    model = tiny_model("llama", seed=trial.number, **{**TEACHER, **sizes}, head_dim=16)
    for key, value in {"arch": arch.to_dict(), "label": arch.describe(), "params": count_params(arch), "candidate": trial.number,
                       "kv_cache_bytes_per_token": kv_cache_bytes(arch), "latency_tokens_per_s": measure_latency(model, 32, 1)}.items():  # fmt: skip
        trial.set_user_attr(key, value)
    if trial.number == 7:
        raise RuntimeError("a worker crashed")
    opt, curve = torch.optim.Adam(model.parameters(), lr=3e-3), []
    for step in range(1, STEPS + 1):
        batch = train[(step * BATCH) % len(train) :][:BATCH]
        loss = F.cross_entropy(model(input_ids=batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            curve.append({"step": step, "val_loss": lm_loss(model, val)})
            trial.report(curve[-1]["val_loss"], step)
            trial.set_user_attr("curve", curve)
            trial.set_user_attr("tokens", step * BATCH * SEQ)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return curve[-1]["val_loss"]


def build_study(root: Path, n_trials: int) -> str:
    gen = torch.Generator().manual_seed(0)
    train, val = (
        torch.randint(0, 128, (32, SEQ), generator=gen),
        torch.randint(0, 128, (8, SEQ), generator=gen),
    )
    teacher = tiny_model("llama", **TEACHER)
    teacher_arch = Arch.from_hf_config(teacher.config)
    space = SpaceConfig(tolerance=0.5, steps={"hidden_size": 16, "ffn_hidden_size": 32})
    candidates = enumerate_candidates(teacher_arch, count_params(teacher_arch) * 3 // 4, space)
    # built here with from_config, whose validator wants hidden_size % num_attention_heads == 0
    candidates = [a for a in candidates if a.hidden_size % a.num_attention_heads == 0]
    print(f"{len(candidates)} candidates in the space")
    url = f"sqlite:///{root / 'study.db'}"
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=EVAL_EVERY, reduction_factor=3)
    study = optuna.create_study(study_name="bench", storage=url, pruner=pruner)
    study.optimize(
        lambda t: objective(t, candidates, train, val), n_trials=n_trials - 1, catch=(RuntimeError,)
    )
    study.ask().report(5.0, EVAL_EVERY)  # one still running
    imp = compute_importance(teacher, train, val).save(root / "importance.safetensors")
    attrs = {"teacher": "tiny llama", "teacher_arch": teacher_arch.to_dict(), "teacher_params": count_params(teacher_arch),
             "teacher_val_loss": lm_loss(teacher, val), "budget": count_params(teacher_arch) * 3 // 4, "importance_path": str(imp),
             "data": "random tokens", "data_fingerprint": "bench", "seed": 0, "horizon_steps": STEPS, "tokens_per_step": BATCH * SEQ,
             "config": {"search": {"top_k": 10}}, "versions": {"optuna": optuna.__version__, "torch": torch.__version__}}  # fmt: skip
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr("stability", ranking_stability(study, 10, STEPS))
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--out", default=None, help="keep the HTML here (default: a temp dir)")
    args = smoke.parse(parser, trials=3)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)  # tiny models
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        url = build_study(Path(tmp), args.trials)
        print(f"built a {args.trials}-trial study in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        data = report_frames(load_study(url, "bench"))
        t1 = time.perf_counter()
        out = write_report(url, "bench", args.out or Path(tmp) / "bench.html")
        t2 = time.perf_counter()
        print(dict(data.trials["state"].value_counts()))
        print(
            f"report_frames: {t1 - t0:.2f} s; write_report (load + frames + render + write): {t2 - t1:.2f} s"
        )
        print(f"file size: {out.stat().st_size / 1e6:.2f} MB (plotly.js alone: 4.8 MB)")


if __name__ == "__main__":
    main()
