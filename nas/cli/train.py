"""`nas distill` and `nas correct`, and the data and training flags other sub-commands share."""

from __future__ import annotations

from nas.errors import ConfigError


def add_data_args(p) -> None:
    """The data flags shared by every sub-command that reads text (see `data_config_from_args`)."""
    p.add_argument(
        "--data",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="local .txt/.jsonl/.parquet file or directory, or a hub dataset id; repeat for a blend, "
        "with an optional :WEIGHT (default 1)",
    )
    p.add_argument("--data-config", help="hub dataset config name (e.g. en)")
    p.add_argument("--data-split", default="train", help="hub dataset split (default train)")
    p.add_argument("--data-streaming", action="store_true", help="stream the hub dataset")
    p.add_argument("--max-documents", type=int, help="read at most this many documents of each source")
    p.add_argument("--text-field", default="text", help="JSON key / column holding the text (default text)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default 512)")
    p.add_argument("--cache-dir", default=".nas_cache/data", help="token cache (default %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train batch sampling (default 0)")


def data_config_from_args(args):
    """A one-phase DataConfig from the `add_data_args` flags (each --data a source of the blend)."""
    from nas.settings import DataConfig, Phase, Source

    if not args.data:
        raise ConfigError("give the text with --data PATH (a local file/directory or a hub dataset id)")
    sources = []
    for spec in args.data:
        path, _, weight = spec.rpartition(":")
        try:
            path, weight = (path, float(weight)) if path else (spec, 1.0)
        except ValueError:  # a ':' that is not a weight (e.g. a Windows drive)
            path, weight = spec, 1.0
        hub = {"config": args.data_config, "split": args.data_split, "streaming": args.data_streaming}
        sources.append(Source(path, weight, args.text_field, max_documents=args.max_documents, **hub))
    phases = (Phase(tuple(sources)),)
    return DataConfig(phases, seq_len=args.seq_len, cache_dir=args.cache_dir, seed=args.data_seed)


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


TRAIN_FLAGS = {  # DistillConfig field -> (type, help)
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per micro-batch"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr": (float, "final learning rate"),
    "warmup_steps": (int, "linear warmup steps"),
    "schedule": (str, "cosine | wsd | constant"),
    "decay_fraction": (float, "WSD: fraction of steps that decay"),
    "weight_decay": (float, "AdamW weight decay (matrices only)"),
    "grad_clip": (float, "max global gradient norm (0: off)"),
    "ce_weight": (float, "loss = (1 - w) * KL + w * CE"),
    "temperature": (float, "KL softmax temperature"),
    "chunk_tokens": (int, "tokens per chunk of the fused head + loss"),
    "eval_every": (int, "steps between validations"),
    "eval_sequences": (int, "validation sequences"),
    "checkpoint_every": (int, "steps between checkpoints (0: none)"),
    "keep_checkpoints": (int, "checkpoints kept on disk"),
    "log_every": (int, "steps between metrics.jsonl train lines"),
    "precision": (str, "auto | fp32 | bf16-mixed | bf16 (see nas.device)"),
    "optimizer": (str, "adamw | adamw-8bit"),
}


def add_train_args(p) -> None:
    from nas.settings import DistillConfig

    defaults = DistillConfig()
    for name, (kind, text) in TRAIN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=getattr(defaults, name), help=f"{text} (default %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--offload-optimizer", action="store_true", help="CUDA: optimizer states on the CPU")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the run (data order: --data-seed)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="processes (GPUs) to train on: reruns itself under torchrun; --batch-size is the global batch",
    )
    p.add_argument("--fsdp", action="store_true", help="with several processes: FSDP2 sharding, not DDP")


def distill_config_from_args(args):
    from nas.settings import DistillConfig

    fields = {name: getattr(args, name) for name in TRAIN_FLAGS}
    return DistillConfig(
        **fields,
        gradient_checkpointing=args.gradient_checkpointing,
        offload_optimizer=args.offload_optimizer,
        fsdp=args.fsdp,
        seed=args.seed,
        device=args.device,
    )


def relaunch_under_torchrun(args) -> int | None:
    """`--nproc-per-node N` (N > 1) outside torchrun: run this same command under torchrun, return its
    exit code; None when this process should do the work itself."""
    from nas.train.launch import inside_torchrun, relaunch

    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.nproc_per_node == 1 or inside_torchrun():
        return None
    argv = list(args.argv)  # the same command line without --nproc-per-node
    for i, arg in enumerate(argv):
        if arg.startswith("--nproc-per-node"):
            del argv[i : i + (1 if "=" in arg else 2)]
            break
    return relaunch(args.nproc_per_node, ["nas.cli", *argv])


def train_and_save(teacher, student, tokenizer, args) -> int:
    """Shared tail of `distill` and `correct`: prepare data, run the loop, save the tokenizer with the model."""
    from pathlib import Path

    from nas.data.tokens import prepare
    from nas.train import dist
    from nas.train.loop import distill

    with dist.rank_zero_first():  # rank 0 fills the token cache, the others read it
        data = prepare(data_config_from_args(args), tokenizer)
    result = distill(teacher, student, data, distill_config_from_args(args), args.out)
    dist.teardown()
    if not dist.world().main:
        return 0
    tokenizer.save_pretrained(Path(args.out) / "model")
    kl = f", val KL {result.val_kl:.4f}" if result.val_kl is not None else ""
    print(
        f"wrote {args.out}/model: {result.steps} steps, {result.tokens:,} tokens, val loss {result.val_loss:.4f}{kl}"
    )
    print(f"{result.tokens_per_s:,.0f} tokens/s over {result.seconds:.1f} s")
    return 0


def launch(args):
    """(exit code of the torchrun re-launch, None) when this process only re-launched itself,
    else (None, this process's device) with the process group set up."""
    from nas.train.dist import local_device, setup

    code = relaunch_under_torchrun(args)
    if code is not None:
        return code, None
    device = local_device(args.device)
    setup(device)
    return None, device


def cmd_distill(args) -> int:
    from nas.model.families import load_teacher_and_student, load_tokenizer

    code, device = launch(args)
    if code is not None:
        return code
    teacher, student = load_teacher_and_student(args.teacher, args.student, device, args.precision)
    return train_and_save(teacher, student, load_tokenizer(args.teacher), args)


def cmd_correct(args) -> int:
    from nas.model.families import load_model, load_tokenizer

    code, device = launch(args)
    if code is not None:
        return code
    teacher = load_model(args.teacher, device=device)
    return train_and_save(None, teacher, load_tokenizer(args.teacher), args)
