"""The `nas` command: one sub-command a function; `main(argv) -> int` (exit 2 on a NasError)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from nas.cli import guard
from nas.cli.flags import add_flags, settings_from_args
from nas.cli.train import add_correct, add_data_args, add_distill, data_config_from_args
from nas.errors import ConfigError, NasError
from nas.io import is_full_disk
from nas.settings import (
    ConstraintsConfig,
    EvalConfig,
    ImportanceConfig,
    Launch,
    PlanConfig,
    RunConfig,
    SearchConfig,
    SpaceConfig,
)


class Parser(argparse.ArgumentParser):
    """argparse with nas's error format: one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"nas: error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nas", description=__doc__)
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
    add_restart(p, "recompute an existing --out file made with other settings")
    p.set_defaults(func=cmd_importance)


def add_restart(p, text: str) -> None:
    p.add_argument("--restart", action="store_true", help=text)


def add_importance_args(p) -> None:
    add_flags(p, ImportanceConfig)
    add_flags(p, RunConfig, ["device"])


def importance_from_data(args, teacher, tokenizer, data_cfg, imp: ImportanceConfig):
    from nas.data.tokens import prepare
    from nas.prune.importance import compute_importance

    data = prepare(data_cfg, tokenizer)
    return compute_importance(
        teacher, data.calib(imp.num_samples), data.val(imp.val_sequences), imp.batch_size
    )


def cmd_importance(args) -> int:
    from nas.data.tokens import prepare
    from nas.device import resolve_device
    from nas.io import require_same
    from nas.model.arch import Arch
    from nas.model.families import load_config, load_model, load_tokenizer
    from nas.prune.importance import Importance, compute_importance, importance_identity

    data_cfg, imp = data_config_from_args(args), settings_from_args(args, ImportanceConfig)
    out = guard.output(args.out, [args.teacher, *guard.data_paths(args)], is_dir=False)
    guard.device(device_of(args))
    guard.seq_len_fits(data_cfg.seq_len, args.teacher)
    with guard.owning(out, is_dir=False):
        tokenizer = load_tokenizer(args.teacher)
        data = prepare(data_cfg, tokenizer)
        teacher_arch = Arch.from_hf_config(load_config(args.teacher))
        identity = importance_identity(
            args.teacher, teacher_arch, data.fingerprint, imp.num_samples, imp.val_sequences
        )
        if out.exists() and not args.restart:  # a finished result: returned if made with these settings
            existing = Importance.load(out)
            ways_out = "write to another --out file, or pass --restart to recompute it"
            require_same(existing.identity, identity, f"importance file {out}", ways_out)
            print(f"{out} is already computed with these settings (base val loss {existing.base_loss:.4f})")
            return 0
        teacher = load_model(args.teacher, device=resolve_device(device_of(args)))
        calib, val = data.calib(imp.num_samples), data.val(imp.val_sequences)
        importance = compute_importance(teacher, calib, val, imp.batch_size)
        importance.identity = identity
        path = importance.save(out)
    print(
        f"wrote {path}: {importance.num_samples} calibration sequences, base val loss {importance.base_loss:.4f}"
    )
    return 0


def device_of(args) -> str:
    return getattr(args, "device", RunConfig.model_fields["device"].default)


def add_prune(sub) -> None:
    p = sub.add_parser("prune", help="cut one architecture out of a teacher and save it")
    p.add_argument("teacher", help="local model directory or hub id")
    p.add_argument("out", help="output model directory")
    p.add_argument("--importance", help="importance file from `nas importance` (or give --data)")
    for knob in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups"):
        p.add_argument(f"--{knob}", type=int, help="(default: the teacher's)")
    p.add_argument(
        "--num-experts", type=int, help="experts kept per layer (mixture of experts; default: all)"
    )
    add_flags(p, RunConfig, ["depth_strategy"])
    add_data_args(p)
    add_importance_args(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from nas.device import resolve_device
    from nas.model.arch import Arch, check_prunable, count_params
    from nas.model.families import load_config, load_model, load_tokenizer
    from nas.prune.cut import prune, save_pruned
    from nas.prune.importance import Importance

    if bool(args.importance) == bool(args.data):
        raise ConfigError("give exactly one of --importance FILE or --data DATA")
    depth_strategy = getattr(args, "depth_strategy", RunConfig.model_fields["depth_strategy"].default)
    if args.data:  # every setting is validated before a model is loaded
        data_cfg, imp = data_config_from_args(args), settings_from_args(args, ImportanceConfig)
    out = guard.output(args.out, [args.teacher, args.importance, *guard.data_paths(args)])
    guard.replaceable_model_dir(out)
    guard.device(device_of(args))
    if args.data:
        guard.seq_len_fits(data_cfg.seq_len, args.teacher)
    teacher_arch = Arch.from_hf_config(load_config(args.teacher))
    knobs = {k: getattr(args, k) for k in teacher_arch.knobs if getattr(args, k) is not None}
    if args.num_experts is not None and not teacher_arch.num_experts:
        raise ConfigError(f"--num-experts needs a mixture-of-experts teacher; {args.teacher} is dense")
    arch = teacher_arch.replace(**knobs)
    check_prunable(teacher_arch, arch)  # fail before loading any weights
    importance = Importance.load(args.importance) if args.importance else None
    if importance is not None:
        importance.check_matches(teacher_arch)
    with guard.owning(out):
        teacher = load_model(args.teacher, device=resolve_device(device_of(args)))
        tokenizer = load_tokenizer(args.teacher)
        if importance is None:
            importance = importance_from_data(args, teacher, tokenizer, data_cfg, imp)
        model = prune(teacher, arch, importance, depth_strategy)
        save_pruned(model, out, tokenizer, teacher=args.teacher)
    numel = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {arch.describe()}, {numel:,} params (analytic {count_params(arch):,})")
    return 0


SUBCOMMANDS += [add_importance, add_prune]


SPACE_FLAGS = ("tolerance", "max_width_prune", "max_depth_prune", "budget_kind")


def add_space(sub) -> None:
    p = sub.add_parser("space", help="print every candidate architecture under a budget (runs nothing)")
    p.add_argument("teacher", help="local model directory or hub id (only its config is read)")
    p.add_argument("--budget", help="4B, 350M, 1.5e9 or 50%% of the teacher; several: 25%%,50%%,75%%")
    add_flags(p, SpaceConfig, SPACE_FLAGS)
    add_flags(p, ConstraintsConfig, ["max_memory", "seq_len", "batch", "dtype"])
    p.add_argument("--study", help="a study: its space, budgets and constraints, with the screen it stored")
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///studies/<study>/study.db)")
    p.set_defaults(func=cmd_space)


def cmd_space(args) -> int:
    from nas.model.arch import Arch, count_params
    from nas.model.families import load_config
    from nas.prune.space import candidates_frame, enumerate_budgets, memory_violation

    config = settings_from_args(args, SpaceConfig, SPACE_FLAGS)
    teacher = Arch.from_hf_config(load_config(args.teacher))
    if args.study:  # the study's own space, budgets and constraints, with the screen it stored
        cfg = stored_config(args)
        config, constraints, budgets = cfg.space, cfg.constraints, cfg.budgets
    else:
        if not args.budget:
            raise ConfigError("give --budget (e.g. 50% or 25%,50%,75%) or --study NAME")
        constraints = settings_from_args(args, ConstraintsConfig, ["max_memory", "seq_len", "batch", "dtype"])
        budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    spaces = enumerate_budgets(teacher, budgets, config)
    frames = []
    for budget, candidates in spaces.items():
        frame = candidates_frame(candidates, teacher, constraints)
        frame.insert(0, "budget", budget)
        frame["over_memory"] = [memory_violation(a, constraints, teacher) > 0 for a in candidates]
        frames.append(frame)
    frame = screen_columns(pd_concat(frames), args) if args.study else pd_concat(frames)
    counts = ", ".join(f"{len(c)} at {b}" for b, c in spaces.items())
    active = f" ({count_params(teacher, active=True):,} active per token)" if teacher.num_experts else ""
    print(f"teacher {teacher.describe()}: {count_params(teacher):,} params{active}; candidates: {counts}")
    if constraints.max_memory:
        print(
            f"{int(frame['over_memory'].sum())} over the memory limit {constraints.max_memory} (never trained)"
        )
    print(frame.drop(columns=[] if constraints.max_memory else ["over_memory"]).to_string(index=False))
    return 0


def stored_config(args):
    """The RunConfig a study recorded (`nas space --study`)."""
    from nas.search.study import load_existing_study
    from nas.settings import run_config_from_dict

    args.storage = args.storage or f"sqlite:///studies/{args.study}/study.db"
    study = load_existing_study(args.storage, args.study)
    if "config" not in study.user_attrs:
        raise ConfigError(f"study {args.study!r} was not created by nas (no config attribute)")
    return run_config_from_dict(study.user_attrs["config"])


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def screen_columns(frame, args):
    """The study's stored screen joined to the space's rows: screen loss, rank (per budget), rejection."""
    from nas.search.study import StudyRecord, load_existing_study

    screened = StudyRecord.read(load_existing_study(args.storage, args.study)).screen or []
    if not screened:
        raise ConfigError(f"study {args.study!r} stored no screen (searched exhaustively or with TPE?)")
    by_label = {(s["budget"], s["label"]): s for s in screened}
    for column, key in (("screen_loss", "loss"), ("screen_rank", "rank"), ("rejected", "rejected")):
        frame[column] = [
            by_label.get((b, label), {}).get(key)
            for b, label in zip(frame["budget"], frame["label"], strict=True)
        ]
    return frame.sort_values(["budget", "screen_rank"], na_position="last", kind="stable")


def add_search(sub) -> None:
    for name, func, text in (
        ("search", cmd_search, "run (or continue) the Optuna search of a study TOML"),
        ("run", cmd_run, "importance -> space -> search -> full distillation -> report, from a study TOML"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("study", help="study TOML file, e.g. studies/mystudy.toml")
        add_flags(p, SearchConfig, ["storage"])
        add_restart(p, "delete a stored study of this name made with other settings, and its outputs")
        p.set_defaults(func=func)
    add_flags(p, Launch)  # `run` only: its final full distillation under torchrun
    p = sub.add_parser("worker", help="join a study in shared storage and run its trials until it is done")
    p.add_argument("--storage", required=True, help="e.g. postgresql+psycopg://user:pw@host/db")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--max-trials", type=int, help="stop after this many trials of this worker")
    add_flags(p, Launch)  # processes (GPUs) per trial: each trial one FSDP2 job over them
    p.set_defaults(func=cmd_worker)


def study_config(args):
    """The study TOML's settings (with --storage), its out_dir checked: writable, no input, and the
    storage URL, device and sequence length valid, before anything is loaded."""
    from nas.search.study import check_storage_url
    from nas.settings import load_run_config

    cfg = load_run_config(args.study)
    if getattr(args, "storage", ""):
        cfg = cfg.replace(search=cfg.search.replace(storage=args.storage))
    sources = [s.path for s in cfg.data.sources]
    guard.output(cfg.root, [cfg.teacher, *sources, args.study])
    check_storage_url(cfg.storage_url)
    guard.device(cfg.device)
    guard.seq_len_fits(cfg.data.seq_len, cfg.teacher)
    return cfg


def cmd_search(args) -> int:
    from nas.pipeline import search

    cfg = study_config(args)
    _, study = search(cfg, restart=args.restart)
    print_trials(study)
    print(f"study {cfg.name} in {cfg.storage_url}")
    return 0


def cmd_run(args) -> int:
    from nas.pipeline import run

    launch = settings_from_args(args, Launch)
    result = run(study_config(args), nproc_per_node=launch.nproc_per_node, restart=args.restart)
    print(f"teacher val loss {result.teacher_val_loss:.4f}; winner val loss {result.winner_val_loss:.4f}")
    for budget, path in result.winners.items():
        print(f"winner of {budget}: {path}")
    print(f"report: {result.report}")
    return 0


def cmd_worker(args) -> int:
    from nas.cli.train import relaunch_under_torchrun
    from nas.pipeline import worker
    from nas.train.dist import teardown

    code = relaunch_under_torchrun(args, settings_from_args(args, Launch))
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
    add_flags(p, PlanConfig, names={"as_json": "json"})
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import json

    from nas.device import visible_gpu_memory
    from nas.plan import format_plan, plan_study, to_json, write_plan
    from nas.plan.dryrun import parse_bytes
    from nas.settings import load_run_config

    options = settings_from_args(args, PlanConfig, names={"as_json": "json"})
    cfg = load_run_config(args.study)
    memory = parse_bytes(options.gpu_memory) if options.gpu_memory else visible_gpu_memory()
    if memory is None:
        raise ConfigError("no GPU is visible here; give the GPU's memory with --gpu-memory, e.g. 80GB")
    plans = plan_study(cfg, memory, options.gpus_per_trial)
    write_plan(cfg, plans, memory)
    print(json.dumps(to_json(plans), indent=1) if options.as_json else format_plan(plans, memory))
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
    add_flags(p, RunConfig, ["device"])
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from nas.demo.run import closing_table, run_demo

    guard.finite("--minutes", args.minutes)
    out = guard.output(args.out, [])
    guard.device(device_of(args))
    with guard.owning(out):
        print(closing_table(run_demo(out, args.minutes, device_of(args))))
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
    out = guard.output(args.out or f"reports/{args.study}.html", [], is_dir=False)
    with guard.owning(out, is_dir=False):
        out = write_report(storage, args.study, out)
    print(f"report: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


SUBCOMMANDS += [add_report]


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity on held-out text and lm-eval tasks (offline: kjv_cloze, kjv_lastword)"
    )
    p.add_argument("model", help="local model directory or hub id")
    add_data_args(p)
    add_flags(p, EvalConfig, names=EVAL_NAMES)
    add_flags(p, RunConfig, ["device"])
    p.add_argument("--out", help="JSON to write (default MODEL/eval.json; eval-<hub id>.json for a hub id)")
    p.set_defaults(func=cmd_eval)


EVAL_NAMES = {"include_paths": "include-path"}


def cmd_eval(args) -> int:
    from nas.evaluate.harness import eval_json_path

    cfg = settings_from_args(args, EvalConfig, names=EVAL_NAMES)
    default = eval_json_path(args.model)
    out = guard.output(
        args.out or default, [args.model, *guard.data_paths(args)], is_dir=False, allow=[default]
    )
    guard.device(device_of(args))
    if args.data:
        guard.seq_len_fits(data_config_from_args(args).seq_len, args.model)
    if cfg.val_sequences is not None and cfg.val_sequences < 1:
        raise ConfigError(
            f"--val-sequences must be at least 1 (an empty set has no perplexity), got {cfg.val_sequences}"
        )
    with guard.owning(out, is_dir=False):
        return _eval(args, cfg, out)


def _eval(args, cfg, out) -> int:
    from nas.evaluate.harness import evaluate_model, format_results, save_results

    record = evaluate_model(
        args.model,
        cfg.tasks,
        data_config_from_args(args) if args.data else None,
        include_paths=cfg.include_paths,
        limit=cfg.limit,
        batch_size=cfg.batch_size,
        num_sequences=cfg.val_sequences,
        device=device_of(args),
    )
    print(format_results(record))
    print(f"\nwrote {save_results(record, out)}")
    return 0


SUBCOMMANDS += [add_eval]


def one_line(e: BaseException) -> str:
    """The message as one line (a message that quotes a multi-line text is joined)."""
    return " ".join(str(e).split()) or type(e).__name__


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
        print(f"nas: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished path met while writing: one line too
        if not (is_full_disk(e) or e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)):
            raise
        print(f"nas: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nas: interrupted", file=sys.stderr)
        return 130
