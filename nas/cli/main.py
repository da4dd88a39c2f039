"""The `nas` command: one sub-command a function; `main(argv) -> int` (exit 2 on a NasError)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from nas.cli import guard
from nas.cli.flags import add_flags, add_overwrite, add_restart, settings_from_args
from nas.cli.study import add_plan, add_search, add_space
from nas.cli.train import add_correct, add_data_args, add_distill, data_config_from_args, kernels_of
from nas.errors import ConfigError, NasError
from nas.io import is_full_disk
from nas.model.blocks import BLOCK_TYPES
from nas.settings import (
    EvalConfig,
    ImportanceConfig,
    RunConfig,
    default_report,
    default_storage,
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
    add_overwrite(p)
    p.set_defaults(func=cmd_importance)


def add_importance_args(p) -> None:
    add_flags(p, ImportanceConfig)
    add_flags(p, RunConfig, ["device", "kernels"])


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
    from nas.io import written_by_nas
    from nas.model.arch import Arch
    from nas.model.families import load_config, load_model, load_tokenizer
    from nas.prune.importance import ensure_importance, importance_identity

    data_cfg, imp = data_config_from_args(args), settings_from_args(args, ImportanceConfig)
    out = guard.output(
        args.out, [args.teacher, *guard.data_paths(args)], is_dir=False, overwrite=args.overwrite
    )
    guard.device(device_of(args))
    guard.seq_len_fits(data_cfg.seq_len, args.teacher)
    with guard.owning(out, is_dir=False):
        tokenizer = load_tokenizer(args.teacher)
        data = prepare(data_cfg, tokenizer)
        teacher_arch = Arch.from_hf_config(load_config(args.teacher))
        identity = importance_identity(
            args.teacher, teacher_arch, data.fingerprint, imp.num_samples, imp.val_sequences
        )
        replace = args.restart or (out.exists() and not written_by_nas(out))  # past guard: --overwrite
        importance, computed = ensure_importance(
            out, lambda: load_model(args.teacher, device=resolve_device(device_of(args)), kernels=kernels_of(args)), data,
            identity,
            imp.batch_size, "write to another --out file, or pass --restart to recompute it", replace,
        )  # fmt: skip
        if not computed:  # a finished result, made with these settings
            print(f"{out} is already computed with these settings (base val loss {importance.base_loss:.4f})")
            return 0
    print(
        f"wrote {out}: {importance.num_samples} calibration sequences, base val loss {importance.base_loss:.4f}"
    )
    return 0


HYBRID_FLAGS = (*(f"num_{t}_layers" for t in BLOCK_TYPES), "num_linear_key_heads", "num_linear_value_heads",
                "num_mamba_heads", "mamba_head_dim")  # fmt: skip


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
    hybrid = "(hybrid stacks; default: the teacher's)"
    for layer_type in BLOCK_TYPES:
        p.add_argument(f"--num-{layer_type.replace('_', '-')}-layers", type=int, help=f"layers of type {layer_type} {hybrid}")
    for knob in ("num-linear-key-heads", "num-linear-value-heads", "num-mamba-heads", "mamba-head-dim"):
        p.add_argument(f"--{knob}", type=int, help=hybrid)
    add_flags(p, RunConfig, ["depth_strategy", "vision"])
    add_data_args(p)
    add_importance_args(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from nas.device import resolve_device
    from nas.model.arch import Arch, check_prunable
    from nas.model.families import load_config, load_model, load_tokenizer
    from nas.model.multimodal import multimodal_note, wrapper_type
    from nas.model.size import count_params
    from nas.prune.cut import prune, save_pruned
    from nas.prune.importance import Importance

    if bool(args.importance) == bool(args.data):
        raise ConfigError("give exactly one of --importance FILE or --data DATA")
    depth_strategy = getattr(args, "depth_strategy", RunConfig.model_fields["depth_strategy"].default)
    vision = getattr(args, "vision", RunConfig.model_fields["vision"].default)
    if args.data:  # every setting is validated before a model is loaded
        data_cfg, imp = data_config_from_args(args), settings_from_args(args, ImportanceConfig)
    out = guard.output(args.out, [args.teacher, args.importance, *guard.data_paths(args)])
    guard.replaceable_model_dir(out)
    guard.device(device_of(args))
    if args.data:
        guard.seq_len_fits(data_cfg.seq_len, args.teacher)
    teacher_arch = Arch.from_hf_config(load_config(args.teacher))
    knobs = {k: getattr(args, k) for k in teacher_arch.knobs if getattr(args, k, None) is not None}
    stray = [k for k in HYBRID_FLAGS if getattr(args, k, None) is not None and k not in teacher_arch.knobs]
    if stray:  # e.g. --num-mamba-heads for a teacher without Mamba2 layers: say so rather than ignore it
        flag = stray[0].replace("_", "-")
        raise ConfigError(f"--{flag} is not a knob of {args.teacher}; its knobs: {', '.join(teacher_arch.knobs)}")
    if args.num_layers is not None and teacher_arch.layer_types:  # the first num_layers layers' types
        knobs["num_layers"] = args.num_layers
    if args.num_experts is not None and not teacher_arch.num_experts:
        raise ConfigError(f"--num-experts needs a mixture-of-experts teacher; {args.teacher} is dense")
    arch = teacher_arch.replace(**knobs)
    check_prunable(teacher_arch, arch)  # fail before loading any weights
    importance = Importance.load(args.importance) if args.importance else None
    if importance is not None:
        importance.check_matches(teacher_arch)
    with guard.owning(out):
        teacher = load_model(args.teacher, device=resolve_device(device_of(args)), kernels=kernels_of(args))
        tokenizer = load_tokenizer(args.teacher)
        if importance is None:
            importance = importance_from_data(args, teacher, tokenizer, data_cfg, imp)
        model = prune(teacher, arch, importance, depth_strategy)
        save_pruned(model, out, tokenizer, teacher=args.teacher, vision=vision)
    numel = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {arch.describe()}, {numel:,} params (analytic {count_params(arch):,})")
    if wrapper := wrapper_type(args.teacher):
        print(f"{args.teacher} is a {wrapper} checkpoint: pruned its text model; vision tower {multimodal_note(vision)}")
    return 0


SUBCOMMANDS += [add_importance, add_prune]


SUBCOMMANDS += [add_space, add_search, add_plan, add_distill, add_correct]


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
    add_overwrite(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from nas.report.family import stored_family, write_family_report
    from nas.report.html import write_report

    storage = args.storage or default_storage(args.study)
    out = guard.output(args.out or default_report(args.study), [], is_dir=False, overwrite=args.overwrite)
    with guard.owning(out, is_dir=False):
        family = stored_family(storage, args.study)  # a cascade's family: its family view
        out = write_family_report(family, out) if family else write_report(storage, args.study, out)
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
    add_flags(p, RunConfig, ["device", "kernels"])
    p.add_argument("--out", help="JSON to write (default MODEL/eval.json; eval-<hub id>.json for a hub id)")
    add_overwrite(p)
    p.set_defaults(func=cmd_eval)


EVAL_NAMES = {"include_paths": "include-path"}


def cmd_eval(args) -> int:
    from nas.evaluate.harness import eval_json_path

    cfg = settings_from_args(args, EvalConfig, names=EVAL_NAMES)
    default = eval_json_path(args.model)
    inputs = [args.model, *guard.data_paths(args)]
    out = guard.output(args.out or default, inputs, is_dir=False, allow=[default], overwrite=args.overwrite)
    guard.device(device_of(args))
    if args.data:
        note = guard.default_seq_len_fits(args, args.model)
        if note:
            print(note)
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
        kernels=kernels_of(args),
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
    # torchao (imported by transformers when installed) warns at import that its CUDA kernels do not load
    # on a CPU build, and torch that its enum registrations are deprecated: nothing a user can act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
