"""Per-family adapters: where each supported `model_type` keeps its units, and how its config maps to `Arch`.

Every supported family keeps its decoder blocks at `model.model.layers`, its final norm at `model.model.norm`,
its embeddings at `model.model.embed_tokens` and its output head at `model.lm_head`; attention lives at
`layer.self_attn` (`o_proj` is the output projection) and the MLP or sparse MoE block at `layer.mlp`.
A `Family` records everything else declaratively: biases, q/k norms (per head or over the whole projection),
which hidden-size norms a block has (pre- and/or post-norms), fused projections, embedding scaling,
per-layer config lists, and where a mixture-of-experts block keeps its router and experts.
Adding a family is one entry in `FAMILIES` (and its tiny model in `nas.testing`).
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nas.device import precision_for
from nas.errors import ModelError, first_line
from nas.model import compat
from nas.model.validate import check_config_fields, check_finite, check_tokenizer_fits, check_weight_dtypes

log = logging.getLogger(__name__)

PRE_NORMS = ("input_layernorm", "post_attention_layernorm")  # Llama: norms before attention and MLP


@dataclass(frozen=True)
class Experts:
    """A sparse MoE block at `layer.mlp`: a router (weight [num_experts, hidden]) and `experts` holding fused 3-D
    parameters `gate_up_proj` [num_experts, 2 * ffn, hidden] and `down_proj` [num_experts, hidden, ffn] (the
    transformers 5 layout; gate rows first, then up rows). gpt-oss stores them transposed
    (`gate_up_proj` [num_experts, hidden, 2 * ffn], `down_proj` [num_experts, ffn, hidden]) with gate and up
    interleaved (gate at even, up at odd positions), and biases on the router and on both expert projections."""

    num_experts_attr: str  # config attribute of the number of experts
    ffn_attr: str  # config attribute of each expert's FFN width
    shared_attr: str | None = None  # config attribute of an always-on shared expert's FFN width (Nemotron-H)
    # the shared expert's output is scaled per token by sigmoid(`shared_expert_gate`), a Linear(hidden, 1) (Qwen3.5-MoE)
    shared_gate: bool = False

    router: str = "gate"  # the router's name in `layer.mlp`
    transposed: bool = False  # expert weights stored [in, out] (gpt-oss)
    interleaved: bool = False  # gate_up_proj holds gate and up channels alternately (gpt-oss)
    bias: bool = False  # biased router and expert projections (`gate_up_proj_bias`, `down_proj_bias`; gpt-oss)


@dataclass(frozen=True)
class Blocks:
    """A hybrid stack (see `nas.model.blocks` for the design): `attr` is the config list naming each layer's
    type; `layers` maps each of its values to the nas block types that layer holds (its own type first);
    `modules` maps a nas block type to the attribute of the decoder layer that holds it."""

    attr: str
    layers: tuple[tuple[str, tuple[str, ...]], ...]  # (HF layer type, nas block types of that layer)
    modules: tuple[tuple[str, str], ...]  # (nas block type, attribute of the decoder layer)

    def layer_type(self, hf_type: str) -> str:
        """The nas type of a layer whose config entry is `hf_type`."""
        return self.units_of_hf(hf_type)[0]

    def units_of_hf(self, hf_type: str) -> tuple[str, ...]:
        for name, units in self.layers:
            if name == hf_type:
                return units
        raise ModelError(f"layer type {hf_type!r} is not one of {', '.join(n for n, _ in self.layers)}")

    def units(self, layer_type: str) -> tuple[str, ...]:
        """The nas block types a layer of nas type `layer_type` holds."""
        return next(units for _, units in self.layers if units[0] == layer_type)

    def hf_type(self, layer_type: str) -> str:
        return next(name for name, units in self.layers if units[0] == layer_type)

    def module(self, layer: nn.Module, block: str) -> nn.Module:
        """The module of block type `block` in a decoder layer."""
        return getattr(layer, dict(self.modules)[block])


@dataclass(frozen=True)
class Family:
    """What distinguishes one supported `model_type` from another."""

    model_type: str
    qkv_bias_attr: str | None  # config attribute that turns on q/k/v bias (None: never)
    qkv_bias_default: bool  # the family's value when the attribute is absent
    o_bias_follows_qkv: bool  # o_proj bias toggles with the same attribute (Llama's attention_bias)
    # q/k norms: "head": an RMSNorm over head_dim (Qwen3, Gemma3); "proj": over all of q, and of k (OLMo2)
    qk_norm: str | None = None
    mlp_bias_attr: str | None = None  # config attribute that turns on MLP bias (None: never)
    norms: tuple[str, ...] = PRE_NORMS  # the hidden-size norms of one block, in forward order
    fused_qkv: bool = False  # one `qkv_proj` (q rows, then k rows, then v rows) instead of q/k/v_proj (Phi-3)
    fused_gate_up: bool = False  # one `gate_up_proj` (gate rows, then up rows) (Phi-3)
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size) (Gemma)
    norm_offset: float = 0.0  # an RMSNorm scales by (offset + weight) (Gemma: 1)
    layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer
    experts: Experts | None = None  # the sparse MoE block, where every layer has one
    rope_factors_follow_hidden: bool = False  # longrope factors are sized by hidden_size // heads (Phi-3)
    blocks: Blocks | None = None  # a hybrid stack: layers of several types (None: every layer the same block)
    attn_output_gate: bool = False  # q_proj also gives a per-head sigmoid output gate (Qwen3.5)
    final_norm: str = "norm"  # the final norm's name under `model.model` (Nemotron-H: `norm_f`)
    gated_mlp: bool = True  # MLPs and experts have a gate projection (Nemotron-H's squared-ReLU MLPs do not)
    ties_embeddings: bool = True  # the HF class can tie its head to the embeddings (Nemotron-H's never does)
    min_experts: int = 1  # fewest experts a MoE layer can keep (Nemotron-H's router takes the top 2 per group)
    attention_sinks: bool = False  # one learned sink logit per query head (`self_attn.sinks`; gpt-oss)
    keep_last_layer: bool = False  # depth pruning never drops the last layer (its type is fixed; Gemma 4)


QWEN3_MOE = Experts("num_experts", "moe_intermediate_size")
MIXTRAL = Experts("num_local_experts", "intermediate_size")
GPT_OSS = Experts("num_local_experts", "intermediate_size", router="router", transposed=True, interleaved=True,
                  bias=True)  # fmt: skip
GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
OLMO_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")  # norms after attention and MLP
NEMOTRON_H_EXPERTS = Experts("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")
# Nemotron-H: each layer is one `mixer` of its `layers_block_type` (transformers names Mamba2 "linear_attention")
NEMOTRON_H_BLOCKS = Blocks(
    "layers_block_type",
    (("linear_attention", ("mamba",)), ("full_attention", ("attention",)), ("mlp", ("mlp",)), ("moe", ("moe",))),
    (("mamba", "mixer"), ("attention", "mixer"), ("mlp", "mixer"), ("moe", "mixer")),
)
QWEN3_5_BLOCKS = Blocks(
    "layer_types",
    (("linear_attention", ("linear_attention", "mlp")), ("full_attention", ("attention", "mlp"))),
    (("attention", "self_attn"), ("linear_attention", "linear_attn"), ("mlp", "mlp")),
)
# Qwen3.5-MoE: Qwen3.5's stack with a sparse MoE block at `mlp` in every layer: routed experts (softmax router,
# top-k renormalised) beside one shared expert (`shared_expert`, gated by `shared_expert_gate`)
QWEN3_5_MOE = Experts(
    "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", shared_gate=True
)
QWEN3_5_MOE_BLOCKS = Blocks(
    "layer_types",
    (("linear_attention", ("linear_attention", "moe")), ("full_attention", ("attention", "moe"))),
    (("attention", "self_attn"), ("linear_attention", "linear_attn"), ("moe", "mlp")),
)

# Gemma 4: sliding-window layers are `attention`, full-attention layers `global_attention` (their own head_dim and
# KV heads, `per_layer_config`; keys as values with `attention_k_eq_v`); both at `self_attn`, each with an MLP
GEMMA4_BLOCKS = Blocks(
    "layer_types",
    (("sliding_attention", ("attention", "mlp")), ("full_attention", ("global_attention", "mlp"))),
    (("attention", "self_attn"), ("global_attention", "self_attn"), ("mlp", "mlp")),
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "attention_bias", False, True, mlp_bias_attr="mlp_bias"),
        Family("mistral", None, False, False),
        Family("ministral3", None, False, False),  # Mistral's blocks; its position-dependent query scale
        # (Llama 4 scaling, from `rope_parameters`) has no weights and follows the config unchanged
        Family("qwen2", None, True, False),
        Family("qwen3", "attention_bias", False, True, qk_norm="head"),
        Family("gemma3_text", "attention_bias", False, True, qk_norm="head", norms=GEMMA_NORMS,
               embed_scale=True, norm_offset=1.0),
        Family("phi3", None, False, False, fused_qkv=True, fused_gate_up=True, rope_factors_follow_hidden=True),
        Family("olmo2", "attention_bias", False, True, qk_norm="proj", norms=OLMO_NORMS),
        Family("olmo3", "attention_bias", False, True, qk_norm="proj", norms=OLMO_NORMS),
        Family("smollm3", "attention_bias", False, True, mlp_bias_attr="mlp_bias",
               layer_lists=("layer_types", "no_rope_layers")),
        Family("qwen3_moe", "attention_bias", False, True, qk_norm="head", experts=QWEN3_MOE),
        Family("mixtral", None, False, False, experts=MIXTRAL),
        Family("qwen3_5_text", "attention_bias", False, True, qk_norm="head", norm_offset=1.0,
               blocks=QWEN3_5_BLOCKS, attn_output_gate=True),
        Family("qwen3_5_moe_text", "attention_bias", False, True, qk_norm="head", norm_offset=1.0,
               blocks=QWEN3_5_MOE_BLOCKS, attn_output_gate=True, experts=QWEN3_5_MOE),
        Family("nemotron_h", None, False, False, mlp_bias_attr="mlp_bias", norms=("norm",), layer_lists=(),
               experts=NEMOTRON_H_EXPERTS, blocks=NEMOTRON_H_BLOCKS, final_norm="norm_f", gated_mlp=False,
               ties_embeddings=False, min_experts=2),
        Family("gpt_oss", "attention_bias", True, True, experts=GPT_OSS, attention_sinks=True),
        # Gemma 4 text: Gemma 3's block (v_norm has no weight; `layer_scalar` is a buffer, kept per layer) in
        # sliding and full-attention layers of their own shapes; transformers makes the last layer full
        # attention, so depth pruning keeps the teacher's last layer
        Family("gemma4_text", "attention_bias", False, True, qk_norm="head", norms=GEMMA_NORMS, embed_scale=True,
               blocks=GEMMA4_BLOCKS, keep_last_layer=True),
    )
}  # fmt: skip


def family_of(config: Any) -> Family:
    """The `Family` of an HF config; a clear error names the supported ones otherwise."""
    compat.apply()  # an HF config exists, so transformers is loaded: mend its breaks before a model runs
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(f"unsupported model_type {model_type!r}; nas supports {', '.join(sorted(FAMILIES))}")
    fam = FAMILIES[model_type]
    if model_type == "gemma4_text":
        _check_gemma4(config)
    if model_type == "qwen3_moe" and (
        list(getattr(config, "mlp_only_layers", None) or []) or getattr(config, "decoder_sparse_step", 1) != 1
    ):
        raise ModelError(
            "qwen3_moe with dense layers (mlp_only_layers or decoder_sparse_step > 1) is not supported: "
            "nas prunes Qwen3-MoE models whose every layer is sparse"
        )
    if model_type == "nemotron_h" and "moe" in getattr(config, "layers_block_type", ()):
        if getattr(config, "moe_latent_size", None) is not None:
            raise ModelError("nemotron_h with latent MoE projections (moe_latent_size) is not supported yet")
        if getattr(config, "n_group", 1) != 1:
            raise ModelError(
                f"nemotron_h with a grouped router (n_group = {config.n_group}) is not supported: nas prunes "
                "Nemotron-H routers of one expert group (n_group = 1, as Nemotron 3 Nano)"
            )
    return fam


GEMMA4_UNSUPPORTED = {  # config attribute -> the Gemma 4 feature it turns on that nas does not prune yet
    "hidden_size_per_layer_input": "per-layer embeddings (hidden_size_per_layer_input)",
    "num_kv_shared_layers": "KV-sharing layers (num_kv_shared_layers)",
    "enable_moe_block": "the expert block beside the MLP (enable_moe_block)",
}


def _check_gemma4(config: Any) -> None:
    """One ModelError naming every Gemma 4 feature a config turns on that nas cannot prune: per-layer
    embeddings, KV-sharing layers, the MoE block, and layers of one type with different attention shapes
    (full-attention layers with their own head_dim / KV heads are supported: `global_attention`)."""
    used = [what for attr, what in GEMMA4_UNSUPPORTED.items() if getattr(config, attr, None)]
    if used := used + _mixed_shapes(config):
        raise ModelError(
            f"gemma4_text with {'; '.join(used)} is not supported: nas prunes Gemma 4 text models (dense, "
            "sliding and full-attention layers of one shape per type) without these features"
        )


def _mixed_shapes(config: Any) -> list[str]:
    """The layer types whose layers do not all have one (head_dim, KV heads)."""
    shapes: dict[str, set] = {}
    for c, t in zip(config.per_layer_config, config.layer_types, strict=True):
        shapes.setdefault(t, set()).add((c.head_dim, c.num_key_value_heads))
    mixed = [t for t, s in shapes.items() if len(s) > 1]
    return [f"{t} layers of different head_dim or KV heads (per_layer_config)" for t in mixed]


def attention_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(head_dim, KV heads) of each HF layer type of a config with per-layer attention shapes (Gemma 4's
    `per_layer_config`: its full-attention layers' `global_head_dim` and `num_global_key_value_heads`)."""
    shapes = {}
    for c, t in zip(config.per_layer_config, config.layer_types, strict=True):
        shapes.setdefault(t, (c.head_dim, c.num_key_value_heads))
    return shapes


def global_value(config: Any, name: str, default: Any = None) -> Any:
    """A config attribute's global value, also where `per_layer_config` overrides it in some layers (transformers
    then refuses a plain read): Gemma 4's `head_dim` and `num_key_value_heads` are its sliding layers'."""
    if getattr(config, "is_heterogeneous", False):
        return config._getattr_without_heterogeneous_validation(name, default)
    return getattr(config, name, default)


def bias_flags(config: Any) -> tuple[bool, bool, bool]:
    """(qkv_bias, o_bias, mlp_bias) of a config, as its family builds the modules."""
    fam = family_of(config)
    qkv = fam.qkv_bias_default
    if fam.qkv_bias_attr is not None:
        qkv = bool(getattr(config, fam.qkv_bias_attr, fam.qkv_bias_default))
    o_bias = qkv if fam.o_bias_follows_qkv else False
    mlp = bool(getattr(config, fam.mlp_bias_attr, False)) if fam.mlp_bias_attr else False
    return qkv, o_bias, mlp or bool(fam.experts and fam.experts.bias)


def gate_up_index(channels: torch.Tensor, ffn: int, spec: Experts | None) -> torch.Tensor:
    """Positions in a fused gate/up projection of the gate and up parts of FFN `channels`: gate rows, then up
    rows (offset by the teacher's `ffn`), or each channel's gate and up side by side (gpt-oss)."""
    if spec is not None and spec.interleaved:
        return torch.stack([2 * channels, 2 * channels + 1], dim=-1).flatten()
    return torch.cat([channels, channels + ffn])


def expert_ffn(experts: nn.Module, spec: Experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of `down_proj`, output) of expert `e` on tokens `x`, in float32, recomputed from the fused
    parameters as the family's forward computes them (gpt-oss: biases and its clamped SwiGLU)."""
    gate_up, down = experts.gate_up_proj[e].float(), experts.down_proj[e].float()
    if spec.transposed:
        gate_up, down = gate_up.T, down.T
    bias = spec.bias
    fused = F.linear(x, gate_up, experts.gate_up_proj_bias[e].float() if bias else None)
    if spec.interleaved:  # gpt-oss: the module's own clamped SwiGLU (alpha, limit) on the interleaved halves
        h = experts._apply_gate(fused)
    else:
        gate, up = fused.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    return h, F.linear(h, down, experts.down_proj_bias[e].float() if bias else None)


HOMOGENEOUS_MODULES = {"attention": "self_attn", "mlp": "mlp", "moe": "mlp"}


def layer_units(config: Any) -> list[tuple[str, ...]]:
    """The nas block types of each decoder layer (`nas.model.blocks`), in order."""
    fam = family_of(config)
    if fam.blocks is None:
        return [("attention", "moe" if fam.experts else "mlp")] * config.num_hidden_layers
    return [fam.blocks.units_of_hf(t) for t in getattr(config, fam.blocks.attr)]


def block_module(layer: nn.Module, family: Family, block: str) -> nn.Module:
    """The module of block type `block` in a decoder layer (attention at `self_attn`, MLP/MoE at `mlp` unless
    the family's `blocks` says otherwise)."""
    if family.blocks is not None:
        return family.blocks.module(layer, block)
    return getattr(layer, HOMOGENEOUS_MODULES[block])


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM."""
    return model.model.layers


def final_norm(model: nn.Module) -> nn.Module:
    return getattr(model.model, family_of(model.config).final_norm)


def layer_norms(layer: nn.Module, family: Family) -> list[nn.Module]:
    """The hidden-size norms of one block (not the q/k norms)."""
    return [getattr(layer, name) for name in family.norms]


def load_config(name_or_path: str | Path) -> Any:
    """The config of a supported causal LM (local directory or hub id), without loading weights; of a
    multimodal checkpoint (`nas.model.multimodal`), its text model's config. Parsed once per process while
    its config.json is unchanged (a command asks for it several times)."""
    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"model directory {name} does not exist; pass a local model directory or a hub id")
    file = Path(name).expanduser() / "config.json"
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return copy.deepcopy(_parsed_config(name, stamp))  # a copy: callers may change theirs


@functools.lru_cache(maxsize=16)
def _parsed_config(name: str, stamp: tuple[int, int] | None) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    from nas.model.multimodal import text_config

    try:
        config = AutoConfig.from_pretrained(name)
        raw, _ = PretrainedConfig.get_config_dict(name)  # the file itself, without transformers' defaults
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a model config from {name!r}: {first_line(e)}") from e
    text = text_config(config)
    if text is not config and text.model_type not in FAMILIES:
        raise ModelError(
            f"unsupported model_type {text.model_type!r} (the text model of a {config.model_type!r} checkpoint); "
            f"nas supports {', '.join(sorted(FAMILIES))}"
        )
    raw = raw.get("text_config", raw) if text is not config else raw
    check_config_fields(name, raw, family_of(text), aliases=dict(getattr(text, "attribute_map", {})))
    return text


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    kernels: str = "off",
) -> nn.Module:
    """Load a supported causal LM from a local directory or a hub id, in eval mode. Strict: unreadable
    weights, or weights that lack tensors the config needs or hold tensors it does not have, are a
    ModelError naming the file (`from_pretrained` alone initialises missing tensors at random).
    `kernels` (the study's `kernels` setting): "off" loads with `use_kernels=False` whatever transformers'
    default (5.25 turns Hub kernels on); "hub" kernelizes the model on `device` (`set_use_kernels`)."""
    from transformers import AutoModelForCausalLM

    from nas.model.multimodal import load_text_model, wrapper_type

    config = load_config(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_readable(local)
    if wrapper_type(name_or_path):  # a multimodal checkpoint: its text model
        model, info = load_text_model(str(name_or_path), dtype)
    else:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(name_or_path), config=config, dtype=dtype, output_loading_info=True, use_kernels=False
            )
        except Exception as e:  # safetensors, torch and transformers each raise their own types
            raise ModelError(
                f"cannot load model weights from {str(name_or_path)!r} (corrupt or incomplete?): {first_line(e)}"
            ) from e
    where = _weights_name(local) if local.is_dir() else str(name_or_path)
    check_complete(info, where)
    check_finite(model, where)
    model = model.to(device).eval()
    if kernels == "hub":
        use_hub_kernels(model, str(name_or_path))
    return model


def use_hub_kernels(model: nn.Module, name: str) -> None:
    """Kernelize `model` with transformers' Hub kernels (the `kernels` package; fetched once from the Hub)."""
    import importlib.util

    if importlib.util.find_spec("kernels") is None:
        raise ModelError("kernels = \"hub\" needs the kernels package: pip install kernels (or set kernels = \"off\")")
    try:
        model.set_use_kernels(True)
    except Exception as e:  # kernels raises its own types, the Hub network errors
        raise ModelError(f"cannot load the Hub kernels for {name!r} (offline?): {first_line(e)}; "
                         "set kernels = \"off\"") from e
    log.info("%s: transformers' Hub kernels on", name)


def check_complete(info: dict[str, Any], where: str) -> None:
    """ModelError unless `from_pretrained`'s loading info (names after transformers' own checkpoint
    conversions, e.g. per-expert tensors fused into one) shows every tensor present and none extra."""
    missing, extra = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or extra:
        what = f"lacks {len(missing)} tensor(s) the config needs (e.g. {missing[0]})" if missing else ""
        what += " and " if missing and extra else ""
        what += f"has {len(extra)} tensor(s) the model does not have (e.g. {extra[0]})" if extra else ""
        raise ModelError(f"weights {where} {what}: incomplete or not this model's weights")
    if mismatched:
        raise ModelError(
            f"weights {where}: tensor {mismatched[0][0]} has a shape the config does not give it"
        )


def _weights_name(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    return str(files[0] if len(files) == 1 else directory)


def check_readable(directory: Path) -> None:
    """Every safetensors file of a model directory must be readable and whole (ModelError naming it)."""
    for file in sorted(directory.glob("*.safetensors")):
        _tensor_shapes(file)


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in a safetensors file; ModelError when it is truncated or not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
            dtypes = {name: s.get_dtype() for name, s in slices.items()}
            shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
    except Exception as e:  # SafetensorError (no public base), OSError
        raise ModelError(f"weights {file} are unreadable (corrupt or truncated): {first_line(e)}") from e
    check_weight_dtypes(file, dtypes)
    return shapes


def load_teacher_and_student(
    teacher: str | Path, student: str | Path, device: torch.device, precision: str = "auto", kernels: str = "off"
):
    """The frozen teacher and the trainable student on `device`, in the dtypes of the precision
    policy (`nas.device`; auto: bf16 teacher and fp32 student on CUDA, both fp32 on CPU)."""
    policy = precision_for(precision, device)
    return (
        load_model(teacher, dtype=policy.teacher_dtype, device=device, kernels=kernels),
        load_model(student, dtype=policy.student_dtype, device=device, kernels=kernels),
    )


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer saved with a model (local directory or hub id)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # tokenizers, json and transformers each raise their own types
        raise ModelError(
            f"cannot load a tokenizer from {str(name_or_path)!r} (tokenizer files corrupt or missing?): "
            f"{type(e).__name__}: {first_line(e)}"
        ) from e
    check_tokenizer_fits(tokenizer, load_config(name_or_path), str(name_or_path))
    return tokenizer
