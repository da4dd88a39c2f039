"""The `nas` command: one sub-command a function; `main(argv) -> int` (exit 2 on a NasError)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nas.cli.train import add_correct, add_data_args, add_distill, data_config_from_args
from nas.errors import ConfigError, NasError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


SUBCOMMANDS: list = []  # each entry: add_<name>(sub) registering a parser with set_defaults(func=...)


def add_importance(sub) -> None:
    p = sub.add_parser("importance", help="score the layers, heads, groups and channels of a teacher")
    p.add_argument("teacher", help="local model directory or hub id")
    add_data_args(p)
    p.add_argument("--out", required=True, help="importance file to write (.safetensors)")
    add_importance_args(p)
    p.set_defaults(func=cmd_importance)


def add_importance_args(p) -> None:
    p.add_argument("--num-samples", type=int, default=1024, help="calibration sequences (default 1024)")
    p.add_argument("--val-sequences", type=int, default=64, help="held-out sequences for layer-drop loss")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")


def importance_from_data(args, teacher, tokenizer):
    from nas.data.tokens import prepare
    from nas.prune.importance import compute_importance

    data = prepare(data_config_from_args(args), tokenizer)
    return compute_importance(
        teacher, data.calib(args.num_samples), data.val(args.val_sequences), args.batch_size
    )


def cmd_importance(args) -> int:
    from nas.device import resolve_device
    from nas.model.families import load_model, load_tokenizer

    teacher = load_model(args.teacher, device=resolve_device(args.device))
    importance = importance_from_data(args, teacher, load_tokenizer(args.teacher))
    path = importance.save(args.out)
    print(
        f"wrote {path}: {importance.num_samples} calibration sequences, base val loss {importance.base_loss:.4f}"
    )
    return 0


def add_prune(sub) -> None:
    from nas.settings import DEPTH_STRATEGIES

    p = sub.add_parser("prune", help="cut one architecture out of a teacher and save it")
    p.add_argument("teacher", help="local model directory or hub id")
    p.add_argument("out", help="output model directory")
    p.add_argument("--importance", help="importance file from `nas importance` (or give --data)")
    for knob in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups"):
        p.add_argument(f"--{knob}", type=int, help="(default: the teacher's)")
    p.add_argument("--depth-strategy", choices=DEPTH_STRATEGIES, default="drop-lowest")
    add_data_args(p)
    add_importance_args(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from nas.device import resolve_device
    from nas.model.arch import KNOBS, Arch, check_prunable, count_params
    from nas.model.families import load_config, load_model, load_tokenizer
    from nas.prune.cut import prune, save_pruned
    from nas.prune.importance import Importance

    if bool(args.importance) == bool(args.data):
        raise ConfigError("give exactly one of --importance FILE or --data DATA")
    teacher_arch = Arch.from_hf_config(load_config(args.teacher))
    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None}
    arch = teacher_arch.replace(**knobs)
    check_prunable(teacher_arch, arch)  # fail before loading any weights
    teacher = load_model(args.teacher, device=resolve_device(args.device))
    tokenizer = load_tokenizer(args.teacher)
    if args.importance:
        importance = Importance.load(args.importance)
    else:
        importance = importance_from_data(args, teacher, tokenizer)
    model = prune(teacher, arch, importance, args.depth_strategy)
    save_pruned(model, args.out, tokenizer, teacher=args.teacher)
    numel = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {arch.describe()}, {numel:,} params (analytic {count_params(arch):,})")
    return 0


SUBCOMMANDS += [add_importance, add_prune]


def add_space(sub) -> None:
    p = sub.add_parser("space", help="print every candidate architecture under a budget (runs nothing)")
    p.add_argument("teacher", help="local model directory or hub id (only its config is read)")
    p.add_argument("--budget", required=True, help="4B, 350M, 1.5e9 or 50%% of the teacher")
    p.add_argument(
        "--tolerance", type=float, default=0.05, help="candidates have budget*(1-tolerance) <= params"
    )
    p.add_argument("--max-width-prune", type=float, default=0.5)
    p.add_argument("--max-depth-prune", type=float, default=0.5)
    p.set_defaults(func=cmd_space)


def cmd_space(args) -> int:
    from nas.model.arch import Arch, count_params
    from nas.model.families import load_config
    from nas.prune.space import candidates_frame, enumerate_candidates
    from nas.settings import SpaceConfig

    teacher = Arch.from_hf_config(load_config(args.teacher))
    config = SpaceConfig(args.tolerance, args.max_width_prune, args.max_depth_prune)
    candidates = enumerate_candidates(teacher, args.budget, config)
    print(f"teacher {teacher.describe()}: {count_params(teacher):,} params; {len(candidates)} candidates")
    print(candidates_frame(candidates, teacher).to_string(index=False))
    return 0


def add_search(sub) -> None:
    for name, func, text in (
        ("search", cmd_search, "run (or continue) the Optuna search of a study TOML"),
        ("run", cmd_run, "importance -> space -> search -> full distillation -> report, from a study TOML"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("study", help="study TOML file, e.g. studies/mystudy.toml")
        p.add_argument("--storage", help="Optuna storage URL (default sqlite under studies/<name>/)")
        p.set_defaults(func=func)
    p.add_argument(  # `run` only: its final full distillation under torchrun
        "--nproc-per-node", type=int, default=1, help="processes (GPUs) for the final distillation"
    )
    p = sub.add_parser("worker", help="join a study in shared storage and run its trials until it is done")
    p.add_argument("--storage", required=True, help="e.g. postgresql+psycopg://user:pw@host/db")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--max-trials", type=int, help="stop after this many trials of this worker")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes (GPUs) per trial: reruns itself under torchrun, each trial one FSDP2 job",
    )
    p.set_defaults(func=cmd_worker)


def study_config(args):
    import dataclasses

    from nas.settings import load_run_config

    cfg = load_run_config(args.study)
    if args.storage:
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, storage=args.storage))
    return cfg


def cmd_search(args) -> int:
    from nas.pipeline import search

    cfg = study_config(args)
    _, study = search(cfg)
    print_trials(study)
    print(f"study {cfg.name} in {cfg.storage_url}")
    return 0


def cmd_run(args) -> int:
    from nas.pipeline import run

    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    result = run(study_config(args), nproc_per_node=args.nproc_per_node)
    print(f"teacher val loss {result.teacher_val_loss:.4f}; winner val loss {result.winner_val_loss:.4f}")
    print(f"winner: {result.winner_dir}\nreport: {result.report}")
    return 0


def cmd_worker(args) -> int:
    from nas.cli.train import relaunch_under_torchrun
    from nas.pipeline import worker
    from nas.train.dist import teardown

    code = relaunch_under_torchrun(args)
    if code is not None:
        return code
    study = worker(args.storage, args.study, args.max_trials)
    teardown()
    if study is not None:  # rank 0 (or the only process)
        print_trials(study)
    return 0


def print_trials(study) -> None:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "user_attrs"))
    columns = [c for c in ("number", "state", "value", "user_attrs_label", "user_attrs_params") if c in frame]
    print(frame[columns].to_string(index=False))


SUBCOMMANDS += [add_space, add_search]


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="peak GPU memory of each stage of a study TOML and the settings that fit (no weights)"
    )
    p.add_argument("study", help="study TOML file (only the teacher's config.json is read)")
    p.add_argument(
        "--gpu-memory", help="memory of one GPU, e.g. 80GB or 79.6GiB (default: the visible GPU's)"
    )
    p.add_argument("--gpus-per-trial", type=int, default=1, help="processes (GPUs) per trial (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as a JSON list of stages")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import json

    from nas.device import visible_gpu_memory
    from nas.plan import format_plan, plan_study, to_json, write_plan
    from nas.plan.dryrun import parse_bytes
    from nas.settings import load_run_config

    cfg = load_run_config(args.study)
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory else visible_gpu_memory()
    if memory is None:
        raise ConfigError("no GPU is visible here; give the GPU's memory with --gpu-memory, e.g. 80GB")
    plans = plan_study(cfg, memory, args.gpus_per_trial)
    write_plan(cfg, plans, memory)
    print(json.dumps(to_json(plans), indent=1) if args.json else format_plan(plans, memory))
    return 0


SUBCOMMANDS += [add_plan]


SUBCOMMANDS += [add_distill, add_correct]


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on real text with a small teacher (~10 min on 2 CPU cores)"
    )
    p.add_argument("--out", default="studies/demo", help="output directory (default %(default)s)")
    p.add_argument(
        "--minutes", type=float, default=10.0, help="scales every stage's steps (default %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from nas.demo.run import closing_table, run_demo

    print(closing_table(run_demo(args.out, args.minutes, args.device)))
    return 0


SUBCOMMANDS += [add_demo]


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="write a study's self-contained HTML report (Pareto fronts, curves, table)"
    )
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///studies/<study>/study.db)")
    p.add_argument("--out", help="HTML file to write (default reports/<study>.html)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from nas.report.html import write_report

    storage = args.storage or f"sqlite:///studies/{args.study}/study.db"
    out = write_report(storage, args.study, args.out or f"reports/{args.study}.html")
    print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


SUBCOMMANDS += [add_report]


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on held-out text and lm-eval tasks (offline: kjv_cloze, kjv_lastword)"
    )
    p.add_argument("model", help="local model directory or hub id")
    add_data_args(p)
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. kjv_cloze or hellaswag,arc_easy")
    p.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="task YAML folder (repeatable)"
    )
    p.add_argument("--limit", type=int, help="score at most N items of each task (default all)")
    p.add_argument("--val-sequences", type=int, help="score at most N validation sequences per --data source")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--out", help="JSON to write (default MODEL/eval.json; eval-<hub id>.json for a hub id)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from nas.evaluate.harness import eval_json_path, evaluate_model, format_results, save_results

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    record = evaluate_model(
        args.model,
        tasks,
        data_config_from_args(args) if args.data else None,
        include_paths=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        num_sequences=args.val_sequences,
        device=args.device,
    )
    print(format_results(record))
    print(f"\nwrote {save_results(record, args.out or eval_json_path(args.model))}")
    return 0


SUBCOMMANDS += [add_eval]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for re-running under torchrun
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 logs progress
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not sys.stderr.isatty():  # no Hugging Face progress bars in logs and pipes
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except NasError as e:
        print(f"nas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130
