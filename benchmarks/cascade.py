"""A chain of models from one teacher: one-shot pruning vs the cascade (Minitron's chain), and a 25% model from scratch.

On the demo's teacher trained on real text (the KJV; `nas.demo`), with the demo's search and distillation
settings, budgets 50% and 25%:
- one-shot: one study, both budgets searched on the teacher and each winner fully distilled from it;
- cascade (`cascade = true`): the 50% stage as above, then the 25% stage searched on the distilled 50%
  winner (importance recomputed on it) and distilled from it. The 25% member gets the same search and
  distillation settings both ways, so its own KD tokens are equal; the cascade's extra cost is that its
  25% member also stands on the 50% stage (which the cascade needs anyway);
- scratch: the cascade 25% winner's architecture, randomly initialised, trained with plain LM loss on as
  many tokens as that member's own KD (its short run + full distillation).
Printed: every member's held-out loss (one protocol, the same validation sequences), the tokens each way,
and the cascade's cost ratios (tokens and KD FLOPs = tokens x (2 N_teacher + 6 N_student)). Honest in either
direction: at this scale the chain may not win.

    python -m benchmarks.cascade [--minutes 10] [--seq-len 256] [--half-width] [--out DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.cascade.report import kd_flops  # noqa: E402
from nas.cascade.runner import run_cascade  # noqa: E402
from nas.demo.run import demo_plan, train_demo_teacher, train_scratch  # noqa: E402
from nas.evaluate.loss import lm_loss  # noqa: E402
from nas.model.load import load_model  # noqa: E402
from nas.pipeline import run  # noqa: E402
from nas.search.study import StudyRecord, TrialRecord, load_existing_study  # noqa: E402
from nas.settings import run_config_from_dict  # noqa: E402


def study_settings(base, out: Path, name: str, teacher_tokens: int, **extra) -> dict:
    """The demo's study settings (`base`) with budgets 50% and 25%, every winner fully distilled."""
    data = base.to_dict()
    data.update(name=name, out_dir=str(out / name), budget=["50%", "25%"], final_budgets=[],
                teacher_tokens=teacher_tokens, **extra)  # fmt: skip
    return data


def one_shot_members(cfg) -> dict[str, dict]:
    """Budget -> {dir, params, tokens (search + final), member_tokens (the winner's own KD)}."""
    study = load_existing_study(cfg.storage_url, cfg.name)
    winners = StudyRecord.read(study).winners or {}
    members = {}
    for budget, w in winners.items():
        search = sum(
            int(TrialRecord.read(t).tokens or 0) for t in study.trials if TrialRecord.read(t).budget == budget
        )
        short = int(TrialRecord.read(study.trials[w["trial"]]).tokens or 0)
        final = int(w["tokens"]) - short
        members[budget] = {
            "dir": w["dir"],
            "params": w["params"],
            "tokens": search + final,
            "member_tokens": int(w["tokens"]),
        }
    return members


def cascade_members(stages: list[dict], storage: str) -> dict[str, dict]:
    """Budget -> {dir, params, tokens (its stage: search + final), member_tokens, kd_teacher_params}."""
    out = {}
    for s in stages:
        study = load_existing_study(storage, s["study"])
        short = int(TrialRecord.read(study.trials[s["winner"]["trial"]]).tokens or 0)
        out[s["label"]] = {"dir": s["winner"]["dir"], "params": s["winner"]["params"],
                           "tokens": int(s["search_tokens"]) + int(s["final_tokens"]),
                           "kd_teacher_params": s["kd_teacher_params"], "member_tokens": short + int(s["final_tokens"])}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="the demo plan's size (nas demo --minutes)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="sequence length (default: the demo's 256); less is cheaper"
    )
    parser.add_argument("--half-width", action="store_true",
                        help="the demo teacher at half its width (hidden 128, FFN 384, 4 heads / 2 groups, vocab 2048; "
                        "8 layers kept): about 4x cheaper per token, for a busy host")  # fmt: skip
    parser.add_argument(
        "--out", help="working directory (default: a temporary one); a trained teacher is reused"
    )
    args = smoke.parse(parser)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plan = smoke.tiny_plan(demo_plan(10)) if args.smoke else demo_plan(args.minutes)
    if args.seq_len:
        plan = replace(plan, seq_len=args.seq_len)
    if args.half_width:
        half = replace(plan.teacher, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2,
                       vocab_size=2048)  # fmt: skip
        plan = replace(
            plan, teacher=half, space={**plan.space, "steps": {"hidden_size": 32, "ffn_hidden_size": 128}}
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp).resolve()
        os.chdir(out)  # the studies' reports go to out/reports
        report(out, plan)


def report(out: Path, plan) -> None:
    start = time.perf_counter()
    base, data, teacher = train_demo_teacher(out, plan)
    one_cfg = run_config_from_dict(study_settings(base, out, "oneshot", teacher.tokens))
    cas_cfg = run_config_from_dict(study_settings(base, out, "cascade", teacher.tokens, cascade=True))
    run(one_cfg, report=False)
    one = one_shot_members(one_cfg)
    stages = run_cascade(cas_cfg).stages
    cas = cascade_members(stages, cas_cfg.storage_url)
    quarter = cas["25%"]
    scratch = train_scratch(
        Path(quarter["dir"]), data, quarter["member_tokens"], plan, out / "scratch", "auto"
    )
    val = torch.as_tensor(data.val(plan.eval_sequences))
    loss = {"teacher": lm_loss(load_model(teacher.path), val), "scratch 25%": lm_loss(scratch.cpu(), val)}
    for way, members in (("one-shot", one), ("cascade", cas)):
        for budget, m in members.items():
            loss[f"{way} {budget}"] = lm_loss(load_model(m["dir"]), val)
    print_results(teacher, one, cas, loss, quarter, plan, time.perf_counter() - start)


def print_results(teacher, one, cas, loss, quarter, plan, seconds) -> None:
    n_t = teacher.params
    print(
        f"teacher: {n_t:,} params, {teacher.tokens:,} pretraining tokens, held-out loss {loss['teacher']:.4f}"
    )
    print(f"{'member':<14}{'params':>12}{'held-out loss':>15}{'member KD tokens':>18}{'stage tokens':>14}")
    for way, members in (("one-shot", one), ("cascade", cas)):
        for budget in ("50%", "25%"):
            m = members[budget]
            print(f"{way + ' ' + budget:<14}{m['params']:>12,}{loss[f'{way} {budget}']:>15.4f}"
                  f"{m['member_tokens']:>18,}{m['tokens']:>14,}")  # fmt: skip
    scratch_tokens = -(-quarter["member_tokens"] // plan.tokens_per_step) * plan.tokens_per_step
    print(f"{'scratch 25%':<14}{quarter['params']:>12,}{loss['scratch 25%']:>15.4f}{scratch_tokens:>18,}")
    one_tokens, cas_tokens = sum(m["tokens"] for m in one.values()), sum(m["tokens"] for m in cas.values())
    one_flops = sum(kd_flops(m["tokens"], n_t, m["params"]) for m in one.values())
    cas_flops = sum(kd_flops(m["tokens"], m["kd_teacher_params"], m["params"]) for m in cas.values())
    print(f"all stages' tokens: cascade {cas_tokens:,}, one-shot {one_tokens:,} ({cas_tokens / one_tokens:.3f}x); "
          f"KD FLOPs cascade / one-shot {cas_flops / one_flops:.3f}x")  # fmt: skip
    print(f"cascade vs each member from scratch on the teacher's {teacher.tokens:,} tokens: "
          f"{cas_tokens / (2 * teacher.tokens):.3f}x the tokens")  # fmt: skip
    diff = loss["cascade 25%"] - loss["one-shot 25%"]
    verdict = "cascade better" if diff < 0 else "one-shot better" if diff > 0 else "tie"
    print(f"25% member: cascade - one-shot = {diff:+.4f} nats ({verdict}); scratch - cascade = "
          f"{loss['scratch 25%'] - loss['cascade 25%']:+.4f} nats; {seconds / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
