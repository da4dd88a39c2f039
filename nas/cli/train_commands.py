"""`nas distill` and `nas correct`, and the data flags other sub-commands share (all from `nas.settings`)."""

from __future__ import annotations

from nas.cli.flags import add_flags, settings_from_args, split_weight
from nas.errors import ConfigError
from nas.settings import DataConfig, DistillConfig, Launch, Phase, RunConfig, Source

# flag names of the data fields whose plain names would be ambiguous beside other settings
DATA_NAMES = {
    "config": "data-config",
    "split": "data-split",
    "streaming": "data-streaming",
    "seed": "data-seed",
}
SOURCE_FLAGS = ("text_field", "messages_field", "chat_template", "mask_prompt", "config", "split", "streaming",
                "max_documents", "max_skipped_share")  # fmt: skip
DATA_FLAGS = ("seq_len", "cache_dir", "seed")


def add_data_args(p) -> None:
    """The data flags shared by every sub-command that reads text (see `data_config_from_args`)."""
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="local .txt/.jsonl/.parquet file or directory, or a hub dataset id; repeat for a blend, "
        "with an optional :WEIGHT (default 1)",
    )
    add_flags(p, Source, SOURCE_FLAGS, DATA_NAMES)
    add_flags(p, DataConfig, DATA_FLAGS, DATA_NAMES)


def data_config_from_args(args) -> DataConfig:
    """A one-phase DataConfig from the `add_data_args` flags (each --data a source of the blend)."""
    if not args.data:
        raise ConfigError("give the text with --data PATH (a local file/directory or a hub dataset id)")
    sources = []
    for spec in args.data:
        path, weight = split_weight(spec)
        sources.append(settings_from_args(args, Source, SOURCE_FLAGS, DATA_NAMES, path=path, weight=weight))
    return settings_from_args(args, DataConfig, DATA_FLAGS, DATA_NAMES, phases=(Phase(tuple(sources)),))


def kernels_of(args) -> str:
    """The `--kernels` flag (transformers' Hub kernels at load), or the study's default."""
    return getattr(args, "kernels", RunConfig.model_fields["kernels"].default)


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="distill a teacher into a student (forward KL on logits); rerun to resume"
    )
    p.add_argument("teacher", help="local model directory or hub id")
    p.add_argument("student", help="student model directory (e.g. from `nas prune`)")
    p.add_argument("out", help="output directory: metrics.jsonl, checkpoints/, model/")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_distill)


def add_correct(sub) -> None:
    p = sub.add_parser(
        "correct", help="teacher correction: fine-tune the teacher briefly on the data (LM loss)"
    )
    p.add_argument("teacher", help="local model directory or hub id")
    p.add_argument("out", help="output directory: metrics.jsonl, checkpoints/, model/")
    add_data_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_correct)


def add_train_args(p) -> None:
    """Every DistillConfig field as a flag, and the number of processes."""
    add_flags(p, DistillConfig)
    add_flags(p, Launch)
    add_flags(p, RunConfig, ["kernels"])
    p.add_argument(
        "--restart", action="store_true", help="delete OUT's run made with other settings and start over"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace metrics.jsonl, checkpoints/, model/ in OUT that nas did not write",
    )


def relaunch_under_torchrun(args, launch: Launch) -> int | None:
    """`--nproc-per-node N` (N > 1) outside torchrun: run this same command under torchrun, return its
    exit code; None when this process should do the work itself."""
    from nas.train.launch import inside_torchrun, relaunch

    if launch.nproc_per_node == 1 or inside_torchrun():
        return None
    argv = list(args.argv)  # the same command line without --nproc-per-node (nor --restart: done here)
    for i, arg in enumerate(argv):
        if arg.startswith("--nproc-per-node"):
            del argv[i : i + (1 if "=" in arg else 2)]
            break
    argv = [arg for arg in argv if arg != "--restart"]
    return relaunch(launch.nproc_per_node, ["nas.cli", *argv])


def train_and_save(teacher, student, tokenizer, args, data_cfg: DataConfig, cfg: DistillConfig) -> int:
    """Shared tail of `distill` and `correct`: prepare data, run the loop, save the tokenizer with the model."""
    from pathlib import Path

    from nas.data.tokens import prepare
    from nas.train import dist
    from nas.train.loop import distill

    with dist.rank_zero_first():  # rank 0 fills the token cache, the others read it
        data = prepare(data_cfg, tokenizer)
    result = distill(teacher, student, data, cfg, args.out)
    dist.teardown()
    if not dist.world().main:
        return 0
    tokenizer.save_pretrained(Path(args.out) / "model")
    kl = f", val KL {result.val_kl:.4f}" if result.val_kl is not None else ""
    print(
        f"wrote {args.out}/model: {result.steps} steps, {result.tokens:,} tokens, val loss {result.val_loss:.4f}{kl}"
    )
    mfu = f", MFU {result.speed['mfu']:.1%}" if result.speed.get("mfu") is not None else ""
    print(f"{result.tokens_per_s:,.0f} tokens/s steady{mfu} (train steps after the warm-up); {result.seconds:.1f} s in all")
    return 0


def launch(args):
    """Validate every setting first (before any model is loaded), then: (exit code of the torchrun
    re-launch, ...) when this process only re-launched itself, else (None, device, data config,
    distill config) with the process group set up."""
    from nas.cli import guard
    from nas.train.dist import local_device, setup

    data_cfg, cfg = data_config_from_args(args), settings_from_args(args, DistillConfig)
    nproc = settings_from_args(args, Launch).nproc_per_node
    guard.batch_splits(cfg.batch_size, nproc)
    code = relaunch_under_torchrun(args, settings_from_args(args, Launch))
    if code is not None:
        return code, None, data_cfg, cfg
    device = local_device(cfg.device)
    setup(device)
    return None, device, data_cfg, cfg


def checked_output(args, *models: str):
    """OUT of `distill` / `correct` checked (writable, no input), the device and --seq-len too, before
    anything is loaded."""
    from nas.cli import guard

    data_cfg, cfg = data_config_from_args(args), settings_from_args(args, DistillConfig)
    guard.batch_splits(cfg.batch_size, settings_from_args(args, Launch).nproc_per_node)  # validated first
    out = guard.output(args.out, [*models, *guard.data_paths(args)])
    guard.run_dir_is_ours(out, args.overwrite)
    guard.device(cfg.device)
    guard.seq_len_fits(data_cfg.seq_len, *models)
    return out


def owned_run(args, out):
    """Hold OUT for the run (the torchrun processes this one starts share the lock); `--restart` clears
    the run's files first."""
    from contextlib import ExitStack

    from nas.cli import guard
    from nas.train.run_files import clear_run

    stack = ExitStack()
    stack.enter_context(guard.owning(out))
    if args.restart:
        clear_run(out)
    return stack


def cmd_distill(args) -> int:
    from nas.model.load import load_teacher_and_student, load_tokenizer

    out = checked_output(args, args.teacher, args.student)
    with owned_run(args, out):
        code, device, data_cfg, cfg = launch(args)
        if code is not None:
            return code
        tokenizer = load_tokenizer(args.teacher)
        teacher, student = load_teacher_and_student(
            args.teacher, args.student, device, cfg.precision, kernels_of(args)
        )
        return train_and_save(teacher, student, tokenizer, args, data_cfg, cfg)


def cmd_correct(args) -> int:
    from nas.model.load import load_model, load_tokenizer

    out = checked_output(args, args.teacher)
    with owned_run(args, out):
        code, device, data_cfg, cfg = launch(args)
        if code is not None:
            return code
        tokenizer = load_tokenizer(args.teacher)
        teacher = load_model(args.teacher, device=device, kernels=kernels_of(args))
        return train_and_save(None, teacher, tokenizer, args, data_cfg, cfg)
