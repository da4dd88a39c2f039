"""The study sub-commands of `nas`: `space` (the candidates, and a study's screen), `search`, `run`,
`worker` (a study TOML or shared storage) and `plan` (its memory plan)."""

from __future__ import annotations

from nas.cli import guard
from nas.cli.flags import add_flags, add_restart, settings_from_args
from nas.errors import ConfigError
from nas.settings import ConstraintsConfig, Launch, PlanConfig, SearchConfig, SpaceConfig, default_storage

SPACE_FLAGS = ("tolerance", "max_width_prune", "max_depth_prune", "budget_kind")


def add_space(sub) -> None:
    p = sub.add_parser("space", help="print every candidate architecture under a budget (runs nothing)")
    p.add_argument("teacher", help="local model directory or hub id (only its config is read)")
    p.add_argument("--budget", help="4B, 350M, 1.5e9 or 50%% of the teacher; several: 25%%,50%%,75%%")
    add_flags(p, SpaceConfig, SPACE_FLAGS)
    p.add_argument("--steps", help="knob steps (the [space.steps] table), e.g. hidden_size=256,ffn_hidden_size=512")
    add_flags(p, ConstraintsConfig, ["max_memory", "seq_len", "batch", "dtype"])
    p.add_argument("--study", help="a study: its space, budgets and constraints, with the screen it stored")
    p.add_argument("--storage", help="the study's storage URL (default sqlite:///studies/<study>/study.db)")
    p.set_defaults(func=cmd_space)


def cmd_space(args) -> int:
    from nas.model.arch import Arch
    from nas.model.load import load_config
    from nas.model.size import count_params
    from nas.prune.space import candidates_frame, enumerate_budgets, memory_violation

    config = settings_from_args(args, SpaceConfig, SPACE_FLAGS)
    if args.steps:
        config = SpaceConfig(**(config.model_dump() | {"steps": parse_steps(args.steps)}))
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
    print(horizon_line(stored_config(args) if args.study else None, teacher, budgets, config.budget_kind))
    return 0


def parse_steps(text: str) -> dict[str, int]:
    """`hidden_size=256,ffn_hidden_size=512` -> {"hidden_size": 256, "ffn_hidden_size": 512}."""
    steps = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        knob, _, value = item.partition("=")
        if not value.strip().isdigit():
            raise ConfigError(f"--steps {item!r}: write KNOB=N, e.g. hidden_size=256")
        steps[knob.strip()] = int(value)
    return steps


def horizon_line(cfg, teacher, budgets: list[str], budget_kind: str = "total") -> str:
    """The search horizon in tokens: the study's, or the default for these budgets (of `budget_kind`
    parameters, as a study with that budget kind counts them)."""
    from nas.search.horizon_plan import per_param_tokens, resolve
    from nas.settings import SearchConfig

    if cfg is not None:
        h = resolve(cfg, teacher)
        return (f"search horizon: {h.tokens:,} KD tokens per candidate ({h.steps} steps of "
                f"{h.tokens_per_step:,} tokens); final distillation {cfg.final_tokens:,} tokens")  # fmt: skip
    per_param = SearchConfig().horizon_tokens_per_param
    tokens = per_param_tokens(teacher, budgets, budget_kind, per_param)
    return (f"search horizon (default): {tokens:,} KD tokens per candidate = {per_param} a "
            "parameter of the largest budget (Minitron §4: 1.8B tokens per 8B candidate); set search.horizon_tokens")


def stored_config(args):
    """The RunConfig a study recorded (`nas space --study`)."""
    from nas.search.study import load_existing_study
    from nas.settings import run_config_from_dict

    args.storage = args.storage or default_storage(args.study)
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
    p.add_argument("--max-trials", type=int, help="stop after this many trials of this worker (at least 1)")
    add_flags(p, Launch)  # processes (GPUs) per trial: each trial one FSDP2 job over them
    p.set_defaults(func=cmd_worker)


def study_config(args):
    """The study TOML's settings (with --storage), its out_dir checked: writable, no input, and the
    storage URL, device and sequence length valid, before anything is loaded."""
    from nas.search.study import check_optuna_schema, check_storage_url
    from nas.settings import load_run_config

    cfg = load_run_config(args.study)
    if getattr(args, "storage", ""):
        cfg = cfg.replace(search=cfg.search.replace(storage=args.storage))
    sources = [s.path for s in cfg.data.sources]
    guard.output(cfg.root, [cfg.teacher, *sources, args.study])
    check_storage_url(cfg.storage_url)
    check_optuna_schema(cfg.storage_url)
    guard.device(cfg.device)
    guard.seq_len_fits(cfg.data.seq_len, cfg.teacher)
    check_against_teacher(cfg)
    return cfg


def check_against_teacher(cfg) -> None:
    """The settings that need the teacher's size, checked from its config alone before anything is
    computed: every budget gives a space, and the memory limit reads and leaves a candidate of each
    budget; the error names the TOML field."""
    from nas.errors import InfeasibleError
    from nas.model.arch import Arch
    from nas.model.load import load_config
    from nas.prune.space import enumerate_budgets, memory_bytes, parse_bytes, within_memory

    teacher = Arch.from_hf_config(load_config(cfg.teacher))
    try:
        spaces = enumerate_budgets(teacher, cfg.budgets, cfg.space)
    except (InfeasibleError, ConfigError) as e:
        raise ConfigError(f"budget = {cfg.budget!r}: {e}") from None
    limit = cfg.constraints.max_memory
    if not limit:
        return
    try:
        limit_bytes = parse_bytes(limit, memory_bytes(teacher, cfg.constraints))
    except ConfigError as e:
        raise ConfigError(f"constraints.max_memory: {e}") from None
    for budget, candidates in spaces.items():
        if not within_memory(candidates, cfg.constraints, teacher)[0]:
            least = min(memory_bytes(a, cfg.constraints) for a in candidates)
            raise ConfigError(
                f"constraints.max_memory = {limit!r} ({limit_bytes:,} B) leaves no candidate of budget "
                f"{budget} (the smallest needs {least:,} B); raise it or lower the budget"
            )


def cmd_search(args) -> int:
    from nas.errors import ConfigError
    from nas.pipeline import search

    cfg = study_config(args)
    if cfg.chained:  # a later stage is cut from the previous stage's distilled winner
        raise ConfigError(
            f"study {cfg.name} is a chain of stages (cascade / iterative_step): each stage's search needs the "
            "previous stage's distilled winner, so run it with nas run"
        )
    ctx, study = search(cfg, restart=args.restart)
    ctx.trackers.close()
    print_trials(study)
    print(f"study {cfg.name} in {cfg.storage_url}")
    return 0


def cmd_run(args) -> int:
    from nas.model.multimodal import multimodal_note, wrapper_type
    from nas.pipeline import run

    launch = settings_from_args(args, Launch)
    cfg = study_config(args)
    guard.batch_splits(
        cfg.final_distill().batch_size, launch.nproc_per_node, "the final distillation's batch_size"
    )
    if cfg.chained:
        return run_cascade_command(cfg, launch, args.restart)
    result = run(cfg, nproc_per_node=launch.nproc_per_node, restart=args.restart)
    print(f"teacher val loss {result.teacher_val_loss:.4f}; winner val loss {result.winner_val_loss:.4f}")
    for budget, path in result.winners.items():
        print(f"winner of {budget}: {path}")
    if wrapper := wrapper_type(cfg.teacher):
        print(f"{cfg.teacher} is a {wrapper} checkpoint: pruned its text model; vision tower {multimodal_note(cfg.vision)}")
    print(f"report: {result.report}")
    return 0


def run_cascade_command(cfg, launch, restart: bool) -> int:
    from nas.cascade.runner import run_cascade

    result = run_cascade(cfg, nproc_per_node=launch.nproc_per_node, restart=restart)
    for stage in result.stages:
        kind = "member" if stage["named"] else "intermediate"
        w = stage["winner"]
        print(f"stage {stage['index']} ({kind} {stage['label']}): {w['params']:,} params, "
              f"val loss {w['final_val_loss']:.4f}, {stage['search_tokens'] + stage['final_tokens']:,} tokens -> {w['dir']}")  # fmt: skip
    print(f"report: {result.report}")
    return 0


def cmd_worker(args) -> int:
    from nas.cli.train_commands import relaunch_under_torchrun
    from nas.pipeline import worker
    from nas.train.dist import teardown

    if args.max_trials is not None and args.max_trials < 1:
        raise ConfigError(
            f"--max-trials must be at least 1 (or left out: until the study is done), got {args.max_trials}"
        )
    launch = settings_from_args(args, Launch)
    if launch.nproc_per_node > 1:  # before any torchrun child starts
        guard.batch_splits(
            stored_config(args).distill.batch_size, launch.nproc_per_node, "distill.batch_size"
        )
    code = relaunch_under_torchrun(args, launch)
    if code is not None:
        return code
    from nas.cascade.report import stored_cascade
    from nas.cascade.runner import cascade_worker

    if stored_cascade(args.storage, args.study):  # a cascade: each stage's trials in turn
        served = cascade_worker(args.storage, args.study)
        teardown()
        print(f"cascade {args.study}: served {served} stages")
        return 0
    study = worker(args.storage, args.study, args.max_trials)
    teardown()
    if study is not None:  # rank 0 (or the only process)
        print_trials(study)
    return 0


def print_trials(study) -> None:
    frame = study.trials_dataframe(attrs=("number", "state", "value", "user_attrs"))
    columns = [c for c in ("number", "state", "value", "user_attrs_label", "user_attrs_params") if c in frame]
    print(frame[columns].to_string(index=False))


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="peak GPU memory of each stage of a study TOML and the settings that fit (no weights)"
    )
    p.add_argument("study", help="study TOML file (only the teacher's config.json is read)")
    add_flags(p, PlanConfig, names={"as_json": "json"})
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import json

    from nas.pipeline.cost import cost_json, format_cost, plan_cost, throughput
    from nas.settings import load_run_config

    options = settings_from_args(args, PlanConfig, names={"as_json": "json"})
    cfg = load_run_config(args.study)
    gpu = options.gpu or visible_gpu_name()
    timed = gpu is not None or options.tokens_per_s is not None
    if not timed and not options.memory:
        raise ConfigError("no GPU is visible here; name the GPU with --gpu (e.g. H100) or give --tokens-per-s")
    speed = throughput(gpu or "GPU", cfg, options.mfu, options.tokens_per_s) if timed else None
    plans = memory_plan(cfg, options, gpu) if options.memory else None
    stages = plan_cost(cfg) if timed else []
    if options.as_json:  # the memory rows alone, as before, unless a GPU makes the time table too
        time = cost_json(stages, speed, options.gpus) if timed else None
        print(json.dumps({"memory": plans, "time": time} if timed else plans, indent=1))
        return 0
    if plans is not None:
        print(plans)
    print(f"\n{format_cost(stages, speed, options.gpus, cfg.name)}" if timed else
          "time and cost: name the GPU with --gpu (e.g. H100), or give --tokens-per-s")  # fmt: skip
    return 0


def memory_plan(cfg, options, gpu: str | None):
    """The memory plan (`nas.plan`) for the GPU's memory: --gpu-memory, the named GPU's, or the visible one's;
    as text, or as JSON rows with --json."""
    from nas.device import visible_gpu_memory
    from nas.pipeline.cost import GPU_MEMORY
    from nas.plan import format_plan, plan_study, to_json, write_plan
    from nas.plan.dryrun import parse_bytes

    named = next((m for k, m in GPU_MEMORY.items() if gpu and k.lower() in gpu.lower()), None)
    memory = parse_bytes(options.gpu_memory or named) if (options.gpu_memory or named) else visible_gpu_memory()
    if memory is None:
        raise ConfigError("no GPU is visible here; give the GPU's memory with --gpu-memory, e.g. 80GB")
    plans = plan_study(cfg, memory, options.gpus_per_trial)
    write_plan(cfg, plans, memory)
    return to_json(plans) if options.as_json else format_plan(plans, memory)


def visible_gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
