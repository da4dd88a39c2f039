"""Peak GPU memory of nas's own code paths, measured on fake tensors (the engine of `nas.plan`).

Nothing here is a formula. Models are built from their `config.json` under torch's `FakeTensorMode`
(tensors with shapes and dtypes but no storage), and the real code paths run on them under
`torch.distributed._tools.mem_tracker.MemTracker`, which records every storage as it is created and
freed: the loop's `train_step` (teacher forward, student forward and backward with the fused KD loss,
clipping, the optimizer update), `nas.evaluate.lm_loss` and the importance pass. One step is run
untracked first, so that the optimizer states exist when the tracked step starts, as in training.

The dry run executes on the CPU (this torch may have no CUDA), under the GPU precision policy of the
plan (`nas.device`): bf16 autocast on the CPU casts the same matmuls to bf16 as on CUDA. Two parts
cannot run here as they do on a GPU and are accounted for instead: torchao's optimizers run their
update eagerly (on CUDA it is one compiled kernel per parameter), so the update's temporaries are
left out; `offload_optimizer` (torchao's CPUOffloadOptimizer needs CUDA) is planned with torch's
AdamW whose states and update are left out of the GPU's memory, where the offload puts them.

Depth: a full 8B step takes minutes on fake tensors, so each measurement runs at 2 and 3 layers per
model (a hybrid stack: per layer type, `depth_axes`) and is extrapolated linearly in each model's number of
layers (of each type), per phase of the step (teacher
forward, student forward, loss, backward, optimizer update, validation) and per memory category:
within a phase every layer adds the same bytes (its weights, gradients, states, saved inputs), so the
extrapolation is exact; `tests/plan/test_plan.py` checks it against the full depth. The peak is the
largest extrapolated phase, so a peak that moves from one phase to another as the model grows is
still found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _RefType
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._pytree import tree_map_only

from nas.device import precision_for, use_precision
from nas.errors import ConfigError
from nas.evaluate.loss import lm_loss
from nas.model.families import family_of
from nas.prune.activations import activation_scores
from nas.settings import DistillConfig
from nas.train import dist as parallel
from nas.train import loop

log = logging.getLogger(__name__)

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "teacher", "loss")
DEVICE = torch.device("cpu")  # where the fake tensors live (see the module docstring)
_MESH = None  # the fake device mesh of `fake_world`
# the depth `extrapolate` measures at (and one more): at 1 layer the backward's peak of Qwen3-1.7B's trial is
# the embedding's gradient at its end, at 2 and more the saved tensors at its start (measured here)
BASE_DEPTH = 2


class _Ref(_RefType):
    """MemTracker's reference types (same names and values, so its own keys index these dicts) plus
    the teacher's tensors and the fused loss's."""

    PARAM = "Parameter"
    BUFFER = "Buffer"
    GRAD = "Gradient"
    ACT = "Activation"
    TEMP = "Temp"
    OPT = "Optstate"
    OTH = "Other"
    TEACHER = "Teacher"
    LOSS = "Loss"


_CATEGORY_OF = {
    _Ref.PARAM: "weights",
    _Ref.GRAD: "gradients",
    _Ref.OPT: "optimizer",
    _Ref.BUFFER: "activations",
    _Ref.ACT: "activations",
    _Ref.TEMP: "activations",
    _Ref.OTH: "activations",
    _Ref.TEACHER: "teacher",
    _Ref.LOSS: "loss",
}


class _NoGradModTracker(ModTracker):
    """torch's ModTracker, except that under `no_grad` no backward hook is put on a module's inputs.

    ModTracker hooks every tensor input that requires grad. Under `no_grad` a view of a parameter
    (`conv1d.weight.squeeze(1)`) still requires grad but has no autograd node, and
    `register_multi_grad_hook` asserts on it. Such a view reaches a module's input only through
    transformers' hub-kernel function modules (`causal_conv1d_forward` of Qwen3.5 / Nemotron-H
    becomes an `nn.Module` whenever the `kernels` package is installed, transformers >= 5.25), so
    the teacher's forward and the validation of every hybrid stack failed. No backward can reach a
    module called under `no_grad`, so nothing is lost: the inputs are detached for the hook only.
    Those function modules sit outside the model's tree and are all of one class (`Func`), so ModTracker named
    them alike and took one called inside another (`causal_conv1d_forward` calls `causal_conv1d_fn`) for a
    broken hierarchy, with a warning per layer: a module it meets outside every tree is named by identity."""

    def _get_mod_name(self, mod):
        if mod not in self._known_modules:  # a root: the model, or a module outside every model
            self._known_modules[mod] = f"{type(mod).__name__}@{id(mod):x}"
        return super()._get_mod_name(mod)

    def _fw_pre_hook(self, mod, input):
        if not torch.is_grad_enabled():
            input = tree_map_only(torch.Tensor, torch.Tensor.detach, input)
        return super()._fw_pre_hook(mod, input)


class _Tracker(MemTracker):
    """MemTracker that files the teacher's weights and forward, and the fused loss's forward, under
    their own categories; with `host_optimizer` the optimizer's memory is left out (it is on the CPU)."""

    def __init__(self, host_optimizer: bool = False, fused_update: bool = False) -> None:
        super().__init__()
        self._mod_tracker = _NoGradModTracker()
        self._ref_class = _Ref
        self.region: _Ref | None = None
        self.host_optimizer = host_optimizer
        self.fused_update = fused_update
        self.phase_peaks: dict[str, dict] = {}
        self.stage = "forward"  # set by `_regions`' hooks as the step moves on (see `_phase`)
        self._after_backward = False

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self._in_opt and (self.host_optimizer or self.fused_update):
            return  # on the CPU / temporaries of an eager run that the compiled update does not make
        if self.region is not None and reftype == _Ref.ACT:
            reftype = self.region
        super()._track(reftype, t)

    def _track_optimizer_states(self, reftype, optimizer) -> None:
        if not self.host_optimizer:
            super()._track_optimizer_states(reftype, optimizer)

    def track_teacher(self, teacher: nn.Module) -> None:
        self._teacher_ids = {id(p) for p in teacher.parameters()}
        self.track_external(teacher)
        self._retag_teacher(teacher)

    def _retag_teacher(self, module: nn.Module) -> None:
        for p in module.parameters():
            if id(p) in getattr(self, "_teacher_ids", ()):
                self._update_and_maybe_create_winfos(p, _Ref.TEACHER)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks)
        self._retag_teacher(module)  # MemTracker files every module's parameters as PARAM on first use
        return sizes

    def _update_peak_stats(self, peak_state) -> None:
        """The whole run's peak and each phase's. MemTracker's own also walks every module at every allocation
        for per-module peaks, which nas never reads: that walk was a quarter of a Qwen3.5 dry run's time."""
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)
        snap = self._curr_mem_snap.get(DEVICE)
        phase = self._phase()
        if snap and snap["Total"] > self.phase_peaks.get(phase, {}).get("Total", -1):
            self.phase_peaks[phase] = dict(snap)

    def _phase(self) -> str:
        """The part of the step now running. Each phase's peak must fall at the same point of the step at
        every depth, since `extrapolate` takes its categories from the runs at `BASE_DEPTH` and one more layer: the
        moments outside the forward (the step's start, with last step's gradients; after the forward,
        with its saved tensors; the clipping after the backward, with the new gradients) are phases of
        their own, else a peak that moves from one to another between depths mixes their categories."""
        if self._in_opt:
            return "optimizer"
        if self._mod_tracker.is_bw:
            self._after_backward = True
            return "backward"
        return "clipping" if self._after_backward else self.stage

    def phases(self) -> dict[str, dict[str, int]]:
        """Per phase of the step, the bytes per category at that phase's peak."""
        return {phase: _categories(snap) for phase, snap in self.phase_peaks.items()}


def _categories(snap: dict) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for ref, category in _CATEGORY_OF.items():
        out[category] += int(snap.get(ref, 0))
    return out


def peak_of(phases: dict[str, dict[str, int]]) -> dict[str, int]:
    """The phase with the highest total: its categories and `peak_bytes` (their sum), `phase`."""
    phase, cats = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    return {**cats, "peak_bytes": sum(cats.values()), "phase": phase}


@contextlib.contextmanager
def _regions(tracker: _Tracker, model: nn.Module) -> Iterator[None]:
    """Hooks that mark the teacher's forward and the loss after it (until the StudentLoss returns), and
    the phases of the step (`_Tracker._phase`)."""
    wrapper = parallel.unwrapped(model)
    teacher, student = wrapper.teacher, wrapper.student
    before_loss = teacher.model if teacher is not None else student.model

    def enter(region, stage):
        return lambda *args, **kwargs: setattr(tracker, "region", region) or setattr(tracker, "stage", stage)

    tracker.stage = "start"
    handles = [
        wrapper.register_forward_pre_hook(enter(None, "forward")),
        before_loss.register_forward_hook(enter(_Ref.LOSS, "loss")),
        wrapper.register_forward_hook(enter(None, "after-forward")),
    ]
    if teacher is not None:
        handles.append(teacher.model.register_forward_pre_hook(enter(_Ref.TEACHER, "teacher")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        tracker.region, tracker.stage = None, "forward"


class _FakeData:
    """`TokenData`'s batch interface with fake token ids (their values never matter for memory)."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len

    def train_batch(self, index: int, batch_size: int, total: int) -> torch.Tensor:
        return torch.zeros(batch_size, self.seq_len, dtype=torch.long)

    def val(self, n: int) -> torch.Tensor:
        return torch.zeros(n, self.seq_len, dtype=torch.long)


def depth_axes(config: Any) -> list[tuple[str | None, int]]:
    """The axes along which a model's memory grows layer by layer: (None, num_layers) for identical blocks; for
    a hybrid stack (`Family.blocks`) one axis per layer type (its config value, its count), since a layer's
    bytes depend on its type."""
    blocks = family_of(config).blocks
    if blocks is None:
        return [(None, config.num_hidden_layers)]
    types = list(getattr(config, blocks.attr))
    return [(t, types.count(t)) for t in dict.fromkeys(types)]


def at_depth(config: Any, num_layers: int | dict[str, int]) -> Any:
    """A copy of an HF config with `num_layers` decoder layers (per-layer lists cut to match); a hybrid's
    `{layer type: count}` gives it that many layers of each type."""
    config = config.__class__.from_dict(config.to_dict())
    overrides = _overrides_by_type(config)
    config.per_layer_config = None  # its layer indices change; given again by type below
    if isinstance(num_layers, dict):
        types = [t for t, n in num_layers.items() for _ in range(n)]
        setattr(config, family_of(config).blocks.attr, types)
        config.num_hidden_layers = len(types)
    else:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            types = list(config.layer_types)
            config.layer_types = [types[i % len(types)] for i in range(num_layers)]
    if overrides:
        types = config.layer_types
        config.per_layer_config = {i: dict(overrides[t]) for i, t in enumerate(types) if t in overrides}
    return config


def _overrides_by_type(config: Any) -> dict[str, dict]:
    """A config's `per_layer_config` overrides (Gemma 4's full-attention shapes) by the type of their layers."""
    raw = config.to_dict().get("per_layer_config") or {}
    return {config.layer_types[int(i)]: overrides for i, overrides in raw.items()}


def at_axes(config: Any, axes: list[tuple[str | None, int]], depths: tuple[int, ...]) -> Any:
    """`config` at `depths`, one count per axis of `depth_axes(config)`."""
    if axes[0][0] is None:
        return at_depth(config, depths[0])
    return at_depth(config, {t: n for (t, _), n in zip(axes, depths, strict=True)})


def fake_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` with fake weights in `dtype` (call under a FakeTensorMode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def fake_mode() -> Iterator[FakeTensorMode]:
    """FakeTensorMode with torch.compile off (torchao's optimizers run their update eagerly: a bound
    from above, the compiled update fuses temporaries away),
    and torchao's lookup tables built from real tensors first."""
    _prepare_torchao()
    with torch.compiler.set_stance("force_eager"), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def _prepare_torchao() -> None:
    with contextlib.suppress(ImportError):
        from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned

        get_qmap_signed(), get_qmap_unsigned()  # cached; built with .tolist(), which fake tensors lack


def measure_train(
    teacher_config: Any | None, student_config: Any, cfg: DistillConfig, seq_len: int
) -> dict[str, int]:
    """Peak bytes per category of one `train_step` (the second one) of `cfg` on fake models."""
    precision = precision_for(cfg.precision, torch.device("cuda"))
    # CPU offload is planned below; one micro-batch a step: more accumulate into the same gradient buffers, so
    # the peak is the same, and MemTracker cannot follow a module called twice in one step
    dry = cfg.replace(offload_optimizer=False, precision=precision.name, grad_accum=1)
    with fake_mode(), use_precision(precision.name):
        teacher = fake_model(teacher_config, precision.teacher_dtype) if teacher_config else None
        student = fake_model(student_config, precision.student_dtype)
        model = parallel.wrap(student, teacher, dry, DEVICE, _MESH)
        optimizer = loop.build_optimizer(student, dry, torch.device("cuda"))  # CUDA's kernels (fused)
        data = _FakeData(seq_len)
        loop._set_checkpointing(student, cfg.gradient_checkpointing)
        model.train()
        loop.train_step(model, data, dry, optimizer, 0)  # creates the optimizer states
        fused = not isinstance(optimizer, torch.optim.AdamW)  # torchao: one compiled kernel per parameter
        tracker = _Tracker(host_optimizer=cfg.offload_optimizer, fused_update=fused)
        tracker.track_external(model, optimizer)
        if teacher is not None:
            tracker.track_teacher(teacher)
        with _regions(tracker, model), tracker, warnings.catch_warnings():
            # transformers' Mamba2 conv builds its activation module per call (`ACT2FN[...]`), gone by the
            # backward, whose hooks MemTracker then skips with a warning (nothing is missed: it holds no tensors)
            warnings.filterwarnings("ignore", "Module is None", UserWarning)
            loop.train_step(model, data, dry, optimizer, 1)
        return tracker.phases() | {"validation": _validation(model, optimizer, dry, data, cfg)}


def _validation(model, optimizer, cfg: DistillConfig, data: _FakeData, planned) -> dict[str, int]:
    """The loop's validation (`lm_loss` on one batch of `eval_batch_size`) right after an update:
    gradients and optimizer states are still allocated then."""
    wrapper = parallel.unwrapped(model)
    tracker = _Tracker(host_optimizer=planned.offload_optimizer)
    tracker.track_external(model, optimizer)
    if wrapper.teacher is not None:
        tracker.track_teacher(wrapper.teacher)
    val = data.val(cfg.eval_batch_size)
    with tracker, contextlib.suppress(DataDependentOutputException):  # raised by the final .item()
        wrapper(fn=lambda student, teacher: lm_loss(student, val, cfg.eval_batch_size))  # as the loop does
    return _categories(tracker.phase_peaks["forward"])


def measure_eval(
    config: Any, dtype: torch.dtype, batch_size: int, seq_len: int, policy: str
) -> dict[str, int]:
    """Peak bytes of `nas.evaluate.lm_loss` on one batch (its peak repeats for every batch)."""
    return _measure_forward(
        config, dtype, policy, lambda model, ids: lm_loss(model, ids, batch_size), batch_size, seq_len
    )


def measure_importance(
    config: Any, dtype: torch.dtype, batch_size: int, seq_len: int, policy: str
) -> dict[str, int]:
    """Peak bytes of the importance pass's activation scoring on one batch (`activation_scores`)."""
    return _measure_forward(
        config,
        dtype,
        policy,
        lambda model, ids: activation_scores(model, ids, batch_size),
        batch_size,
        seq_len,
    )


def _measure_forward(
    config: Any, dtype: torch.dtype, policy: str, run, batch_size: int, seq_len: int
) -> dict[str, int]:
    """Peak bytes of `run(model, ids)`, a teacher-only pass, on a fake model of `config`."""
    with fake_mode(), use_precision(policy):
        model = fake_model(config, dtype)
        tracker = _Tracker()
        tracker.track_external(model)
        with tracker, contextlib.suppress(DataDependentOutputException):  # lm_loss's final .item()
            run(model, torch.zeros(batch_size, seq_len, dtype=torch.long))
        return _as_teacher(tracker.phases())


def _as_teacher(phases: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The stages that only run the teacher: its weights are the `teacher` category."""
    for cats in phases.values():
        cats["teacher"], cats["weights"] = cats["teacher"] + cats["weights"], 0
    return phases


def extrapolate(measure, layers: tuple[int, ...]) -> dict[str, dict[str, int]]:
    """Per-phase categories of `measure(depths)` (one layer count per model) at `layers`, from runs
    at `BASE_DEPTH` and one more layer: along the diagonal when all models have the same depth, else one
    model at a time."""
    base = measure((BASE_DEPTH,) * len(layers))
    if len(set(layers)) == 1:
        slopes = [(_minus(measure((BASE_DEPTH + 1,) * len(layers)), base), layers[0] - BASE_DEPTH)]
    else:
        bumped = [tuple(BASE_DEPTH + (j == i) for j in range(len(layers))) for i in range(len(layers))]
        slopes = [(_minus(measure(d), base), n - BASE_DEPTH) for d, n in zip(bumped, layers, strict=True)]
    out = {}
    for phase, cats in base.items():
        if all(phase in slope for slope, _ in slopes):
            out[phase] = {k: max(0, cats[k] + sum(s[phase][k] * n for s, n in slopes)) for k in CATEGORIES}
    return out


def _minus(a: dict, b: dict) -> dict:
    return {p: {k: a[p][k] - b[p][k] for k in CATEGORIES} for p in a.keys() & b.keys()}


@contextlib.contextmanager
def fake_world(gpus: int) -> Iterator[None]:
    """A fake process group of `gpus` ranks (this process is rank 0), so FSDP2 shards as it would."""
    if gpus == 1:
        yield
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(gpus))
    dist.init_process_group("fake", rank=0, world_size=gpus, store=FakeStore())
    global _MESH
    _MESH = init_device_mesh("cpu", (gpus,))  # outside fake mode: building it reads tensor values
    try:
        yield
    finally:
        _MESH = None
        dist.destroy_process_group()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def gib(n: float) -> float:
    return n / 2**30


def parse_bytes(text: str) -> int:
    """'80GB', '80 GiB', '79.6e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tb": 10**12, "b": 1}
    t = text.strip().lower().replace(" ", "")
    unit = next((u for u in units if t.endswith(u)), "b")
    try:
        return int(float(t.removesuffix(unit)) * units[unit])
    except ValueError:
        raise ConfigError(f"cannot read a memory size from {text!r}; write e.g. 80GB or 79.6GiB") from None
