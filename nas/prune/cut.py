"""Materialise a candidate from the teacher: keep the top-ranked layers, hidden channels, KV groups,
query heads, MLP channels and experts (index selection on the weights; the teacher is never modified).

Which tensor is cut along which axis follows the family adapter (`nas.model.families.Family`): fused projections
are cut in each of their parts, q/k norms over the whole projection are cut with their heads, MoE routers
keep the rows of the kept experts, each kept expert keeps its own top-ranked FFN channels, and a shared expert
(with its gate) keeps its width, cut along the kept hidden channels only."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.errors import ConfigError
from nas.io import replace_dir, temp_dir
from nas.model.arch import Arch, check_prunable
from nas.model.card import CARD_FILE
from nas.model.families import Family, gate_up_index
from nas.model.multimodal import multimodal_note, with_vision, wrapper_type
from nas.model.size import count_params
from nas.prune import nemotron
from nas.prune.importance import Importance
from nas.settings import DEPTH_STRATEGIES, VISION

log = logging.getLogger(__name__)

CUT_FILE = "nas_pruning.json"


@dataclass(frozen=True)
class Cut:
    """Which teacher units a candidate keeps (teacher indices, in teacher order)."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]  # per kept layer: kept query heads, grouped by kept KV group
    groups: list[list[int]]  # per kept layer: kept KV groups
    mlp: list  # per kept layer: kept MLP channels (MoE: per kept expert, that expert's kept channels)
    depth_strategy: str
    experts: list[list[int]] = field(default_factory=list)  # per kept layer: kept experts (MoE only)
    # hybrid stacks, per kept layer ([] where the layer has no such block): Gated DeltaNet key heads and
    # value heads (grouped by kept key head); Mamba2 heads (grouped by group) and head_dim channels
    linear_keys: list[list[int]] = field(default_factory=list)
    linear_values: list[list[int]] = field(default_factory=list)
    mamba_heads: list[list[int]] = field(default_factory=list)
    mamba_dims: list[list[int]] = field(default_factory=list)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: lower index wins)."""
    # a stable sort of the negated scores keeps lower indices first among ties; one C-level sort, not a
    # Python key per unit (the screen plans the cuts of thousands of candidates of 14k-channel layers)
    order = torch.sort(-torch.as_tensor(scores).float(), stable=True).indices[:k]
    return sorted(order.tolist())


def keep_layers(importance: Importance, teacher: Arch, arch: Arch, depth_strategy: str) -> list[int]:
    """The teacher layers to keep: all but the least important, or all but the best contiguous block. A hybrid
    stack keeps `arch`'s count of each layer type, comparing layers only within their type (drop-lowest: the
    held-out loss with the layer removed; contiguous: the run of consecutive layers of that type, in the type's
    order, with the lowest summed Block Importance)."""
    if depth_strategy not in DEPTH_STRATEGIES:
        raise ConfigError(f"depth strategy {depth_strategy!r} is not one of {', '.join(DEPTH_STRATEGIES)}")
    total = importance.layer_loss.numel()
    if not teacher.layer_types:
        return _keep_of(list(range(total)), arch.num_layers, importance, depth_strategy, block=True)
    kept: list[int] = []
    for t in dict.fromkeys(teacher.layer_types):
        of_type = [i for i, lt in enumerate(teacher.layer_types) if lt == t]
        keep = arch.layer_count(t)
        if teacher.family.keep_last_layer and of_type[-1] == total - 1:  # the last layer stays (Gemma 4)
            of_type, keep, kept = of_type[:-1], keep - 1, [*kept, total - 1]
        kept += _keep_of(of_type, keep, importance, depth_strategy, block=False)
    return sorted(kept)


def _keep_of(layers: list[int], keep: int, importance: Importance, depth_strategy: str, block: bool) -> list[int]:
    """`keep` of the teacher `layers` (block: the layers are the whole stack, so a block's BI is measured)."""
    drop = len(layers) - keep
    if drop == 0:
        return layers
    if depth_strategy == "drop-lowest":
        return [layers[j] for j in top_k(importance.layer_loss[layers], keep)]
    # contiguous: the run whose removal changes the residual stream least (lowest block BI)
    bi = importance.layer_bi[layers]

    def cost(s: int) -> float:
        return float(importance.block_bi[layers[s], layers[s] + drop]) if block else float(bi[s : s + drop].sum())

    best = min(range(0, len(layers) - drop + 1), key=lambda s: (cost(s), s))
    return [layer for j, layer in enumerate(layers) if not best <= j < best + drop]


def _grouped(scores: torch.Tensor, groups: list[int], per_group: int, keep: int) -> list[int]:
    """The top `keep` units within each kept group of `per_group` consecutive units (teacher indices)."""
    kept = []
    for g in groups:
        kept += [g * per_group + u for u in top_k(scores[g * per_group : (g + 1) * per_group], keep)]
    return kept


def plan_cut(teacher: Arch, arch: Arch, importance: Importance, depth_strategy: str = "drop-lowest") -> Cut:
    """Decide every kept unit of `arch` from the teacher's importance (pure: no weights touched)."""
    check_prunable(teacher, arch)
    importance.check_matches(teacher)
    layers = keep_layers(importance, teacher, arch, depth_strategy)
    units = [teacher.family.blocks.units(teacher.layer_types[i]) for i in layers] if teacher.layer_types else None
    cut = Cut(layers, top_k(importance.hidden, arch.hidden_size), [], [], [], depth_strategy)
    for n, layer in enumerate(layers):
        blocks = units[n] if units else teacher.blocks
        _plan_layer(cut, blocks, layer, teacher, arch, importance)
    return cut


def _plan_layer(cut: Cut, blocks, layer: int, teacher: Arch, arch: Arch, importance: Importance) -> None:
    """Append one kept layer's units to the per-layer lists of `cut` ([] for a block the layer lacks; the lists
    of unit kinds the teacher has none of stay empty)."""
    groups = top_k(importance.groups[layer], arch.num_query_groups) if "attention" in blocks else []
    per_group, keep = teacher.heads_per_group, arch.heads_per_group
    if "global_attention" in blocks:  # Gemma 4's full attention: the same heads rule in its own KV groups
        groups = top_k(importance.global_groups[layer], arch.num_global_query_groups)
        per_group, keep = teacher.global_heads_per_group, arch.global_heads_per_group
    cut.groups.append(groups)
    cut.heads.append(_grouped(importance.heads[layer], groups, per_group, keep))
    if "linear_attention" in teacher.blocks:
        keys = top_k(importance.linear_key_heads[layer], arch.num_linear_key_heads) if "linear_attention" in blocks else []
        cut.linear_keys.append(keys)
        per_key, keep = teacher.linear_values_per_key, arch.linear_values_per_key
        cut.linear_values.append(_grouped(importance.linear_heads[layer], keys, per_key, keep))
    if "mamba" in teacher.blocks:  # heads evenly inside each of the groups, in group order (Minitron-SSM)
        mamba = "mamba" in blocks
        groups = list(range(teacher.mamba_groups)) if mamba else []
        per, keep = teacher.num_mamba_heads // teacher.mamba_groups, arch.num_mamba_heads // teacher.mamba_groups
        cut.mamba_heads.append(_grouped(importance.mamba_heads[layer], groups, per, keep))
        cut.mamba_dims.append(top_k(importance.mamba_head_dims[layer], arch.mamba_head_dim) if mamba else [])
    if "moe" in blocks:
        experts = top_k(importance.experts[layer], arch.num_experts)
        cut.experts.append(experts)
        cut.mlp.append([top_k(importance.mlp[layer, e], arch.ffn_hidden_size) for e in experts])
    else:
        if "moe" in teacher.blocks:
            cut.experts.append([])
        scores = importance.mlp[layer]
        scores = scores[0] if scores.dim() > 1 else scores  # beside MoE layers: every expert row the same
        cut.mlp.append(top_k(scores, arch.ffn_hidden_size) if "mlp" in blocks else [])


def _unit_rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units (heads or groups of `size` rows each)."""
    return torch.tensor([u * size + r for u in units for r in range(size)], dtype=torch.long)


def _select(
    t: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.clone()


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _fused_rows(parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Rows of a fused projection: each part's kept rows, offset by the teacher sizes of the parts before it."""
    offset, rows = 0, []
    for kept, size in parts:
        rows.append(kept + offset)
        offset += size
    return torch.cat(rows)


def _layer_rules(teacher: Arch, arch: Arch, cut: Cut, new: int, head_dim: int) -> dict[str, tuple]:
    """(rows, cols) kept of each module (or of each parameter held directly by a block, e.g. `A_log`) of kept
    layer `new`, whose attention heads are `head_dim` wide; "hid" stands for the kept hidden channels, None for
    all. (A Gemma 4 full-attention layer with keys as values has no v_proj: its keys' rows serve both.)"""
    q = _unit_rows(cut.heads[new], head_dim)
    kv = _unit_rows(cut.groups[new], head_dim)
    big_q = teacher.num_attention_heads * head_dim
    big_kv = teacher.num_query_groups * head_dim
    gated = _unit_rows(cut.heads[new], 2 * head_dim)  # q_proj with an output gate: [query, gate] a head
    rules = {
        "q_proj": (gated if arch.attn_output_gate else q, "hid"),
        "k_proj": (kv, "hid"),
        "v_proj": (kv, "hid"),
        "qkv_proj": (_fused_rows([(q, big_q), (kv, big_kv), (kv, big_kv)]), "hid"),
        "o_proj": ("hid", q),
    }
    if arch.family.qk_norm == "proj":  # one norm over all heads' channels (OLMo2)
        rules.update(q_norm=(q, None), k_norm=(kv, None))
    if arch.family.attention_sinks:  # `self_attn.sinks`: one logit per query head (gpt-oss)
        rules["self_attn"] = (_long(cut.heads[new]), None)
    if arch.num_experts:
        rules[arch.family.experts.router] = (_long(cut.experts[new]), "hid")  # one row (and bias) per expert
        if arch.shared_expert_ffn_hidden_size:  # shared expert and gate keep their width (Qwen3.5-MoE)
            rules.update(gate_proj=(None, "hid"), up_proj=(None, "hid"), down_proj=("hid", None))
            rules["shared_expert_gate"] = (None, "hid")
    else:
        ffn = _long(cut.mlp[new])
        f = teacher.ffn_hidden_size
        rules.update(gate_proj=(ffn, "hid"), up_proj=(ffn, "hid"), down_proj=("hid", ffn))
        rules["gate_up_proj"] = (_fused_rows([(ffn, f), (ffn, f)]), "hid")
    if cut.linear_keys and cut.linear_keys[new]:
        rules |= _linear_attention_rules(teacher, cut, new)
    return rules


def _linear_attention_rules(teacher: Arch, cut: Cut, new: int) -> dict[str, tuple]:
    """Gated DeltaNet: the kept key heads' q and k rows and the kept value heads' v rows of `in_proj_qkv` (and of
    the depthwise `conv1d` over them), the kept value heads of `in_proj_z`, `in_proj_b`, `in_proj_a`, `dt_bias`,
    `A_log` and of the `out_proj` input; the gated norm over one value head is kept whole."""
    dk, dv = teacher.linear_key_head_dim, teacher.linear_value_head_dim
    keys, values = _unit_rows(cut.linear_keys[new], dk), _unit_rows(cut.linear_values[new], dv)
    key_dim = teacher.num_linear_key_heads * dk
    qkv = _fused_rows([(keys, key_dim), (keys, key_dim), (values, teacher.num_linear_value_heads * dv)])
    heads = _long(cut.linear_values[new])
    return {
        "in_proj_qkv": (qkv, "hid"),
        "conv1d": (qkv, None),
        "in_proj_z": (values, "hid"),
        "in_proj_b": (heads, "hid"),
        "in_proj_a": (heads, "hid"),
        "dt_bias": (heads, None),
        "A_log": (heads, None),
        "out_proj": ("hid", values),
    }


def _cut_experts(tensor: torch.Tensor, kind: str, teacher: Arch, cut: Cut, new: int, hid: torch.Tensor):
    """The kept experts of a fused 3-D expert parameter (or of its bias), each with its own kept FFN channels."""
    spec, kept = teacher.family.experts, []
    for e, channels in zip(cut.experts[new], cut.mlp[new], strict=True):
        ch = _long(channels)
        fused = gate_up_index(ch, teacher.ffn_hidden_size, spec)
        if kind == "gate_up_proj_bias":
            kept.append(_select(tensor[e], rows=fused))
        elif kind == "down_proj_bias":
            kept.append(_select(tensor[e], rows=hid))
        else:  # [out, in], or [in, out] transposed (gpt-oss)
            out_in = (fused, hid) if kind == "gate_up_proj" else (hid, ch)
            rows, cols = out_in[::-1] if spec.transposed else out_in
            kept.append(_select(tensor[e], rows=rows, cols=cols))
    return torch.stack(kept)


def _cut_tensor(
    tensor: torch.Tensor, local: str, rules: dict, fam: Family, hid: torch.Tensor
) -> torch.Tensor:
    if "." not in local:  # a tensor of the block itself (Gemma 4's `layer_scalar`)
        return tensor.clone()
    module, kind = local.rsplit(".", 1)[0].split(".")[-1], local.rsplit(".", 1)[1]
    if module in fam.norms and local.count(".") == 1:  # the layer's own hidden-size norms
        return _select(tensor, rows=hid)
    if module not in rules and kind in rules:  # a parameter held by the block itself (A_log, dt_bias)
        module, kind = kind, "weight"
    if module not in rules:  # per-head q_norm / k_norm, a gated norm over one head: head_dim is kept
        return tensor.clone()
    rows, cols = (hid if r == "hid" else r for r in rules[module])
    return _select(tensor, rows=rows, cols=cols if kind == "weight" else None)


def _embedding_scale(teacher: Arch, arch: Arch) -> float:
    """Factor on the cut embeddings of a family that scales them by sqrt(hidden_size) (Gemma): the student's
    residual stream then starts from the teacher's values on the kept channels."""
    return math.sqrt(teacher.hidden_size / arch.hidden_size) if arch.family.embed_scale else 1.0


def cut_state_dict(teacher: nn.Module, arch: Arch, cut: Cut) -> dict[str, torch.Tensor]:
    """The candidate's weights: the teacher's tensors with only the kept rows and columns."""
    if arch.model_type == "nemotron_h":  # one mixer a layer, names of its own (`nas.prune.nemotron`)
        return nemotron.cut_state_dict(teacher, cut.layers, nemotron_keeps(teacher.config, cut), cut.hidden)
    sd = teacher.state_dict()
    teacher_arch, fam = Arch.from_hf_config(teacher.config), arch.family
    hid = _long(cut.hidden)
    scale = _embedding_scale(teacher_arch, arch)
    out = {"model.embed_tokens.weight": _select(sd["model.embed_tokens.weight"], cols=hid)}
    if scale != 1.0:
        out["model.embed_tokens.weight"] *= scale
    out["model.norm.weight"] = _select(sd["model.norm.weight"], rows=hid)
    if arch.tie_word_embeddings:
        # the same (cut) tensor; tie_weights() below makes them one parameter again. A scaled embedding
        # also scales the logits, which the final norm's weight takes back.
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
        if scale != 1.0:
            norm = out["model.norm.weight"]
            out["model.norm.weight"] = (norm + fam.norm_offset) / scale - fam.norm_offset
    else:
        out["lm_head.weight"] = _select(sd["lm_head.weight"], cols=hid)
    for new, old in enumerate(cut.layers):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        full = teacher_arch.layer_types and teacher_arch.layer_types[old] == "global_attention"
        rules = _layer_rules(teacher_arch, arch, cut, new, arch.global_head_dim if full else arch.head_dim)
        for name, tensor in sd.items():
            if not name.startswith(src):
                continue
            local = name[len(src) :]
            if local.startswith("mlp.experts."):
                out[dst + local] = _cut_experts(tensor, local.split(".")[-1], teacher_arch, cut, new, hid)
            else:
                out[dst + local] = _cut_tensor(tensor, local, rules, fam, hid)
    return out


def nemotron_keeps(config: Any, cut: Cut) -> list[nemotron.BlockKeep]:
    """The units of each kept Nemotron-H layer, from the per-layer lists of `cut` (a shared expert kept whole)."""
    keeps = []
    for new, old in enumerate(cut.layers):
        kind = config.layers_block_type[old]
        moe = kind == nemotron.MOE
        keeps.append(nemotron.BlockKeep(
            kind, heads=cut.heads[new], groups=cut.groups[new], mlp=cut.mlp[new],
            experts=cut.experts[new] if moe else [],
            shared=list(range(config.moe_shared_expert_intermediate_size)) if moe else [],
            mamba_heads=cut.mamba_heads[new] if cut.mamba_heads else [],
            mamba_channels=cut.mamba_dims[new] if cut.mamba_dims else [],
        ))  # fmt: skip
    return keeps


def build_model(teacher: nn.Module, arch: Arch, cut: Cut) -> nn.Module:
    """A fresh HF model of `arch` holding the cut weights, on the teacher's device and dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = arch.to_hf_config(teacher.config, kept_layers=cut.layers)
    param = next(teacher.parameters())
    with no_init_weights(), torch.device(param.device):
        model = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    model.load_state_dict(cut_state_dict(teacher, arch, cut), strict=True)
    if arch.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def prune(
    teacher: nn.Module, arch: Arch, importance: Importance, depth_strategy: str = "drop-lowest"
) -> nn.Module:
    """The candidate `arch` cut out of `teacher` by importance; `model.nas_cut` records what was kept."""
    teacher_arch = Arch.from_hf_config(teacher.config)
    cut = plan_cut(teacher_arch, arch, importance, depth_strategy)
    with torch.no_grad():
        model = build_model(teacher, arch, cut)
    model.nas_cut = cut
    log.info("pruned %s -> %s (%d params)", teacher_arch.describe(), arch.describe(), count_params(arch))
    return model


def save_pruned(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any = None,
    teacher: str | None = None,
    vision: str = "drop",
    card: str | None = None,
) -> Path:
    """`save_pretrained` (safetensors + config [+ tokenizer]), `nas_pruning.json` with the kept units and
    the model card `README.md` (`card`, `nas.model.card`), written into a temp directory that replaces
    `out` once complete (a failure, e.g. a full disk, leaves `out` as it was and no partial directory). A
    `teacher` that is a multimodal checkpoint (`nas.model.multimodal`): `vision` "drop" writes the text
    model alone, "keep" the teacher's wrapper model around it; `nas_pruning.json` says which."""
    if vision not in VISION:
        raise ConfigError(f"vision {vision!r} is not one of {', '.join(VISION)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cut, wrapper = getattr(model, "nas_cut", None), wrapper_type(teacher)
    export = model
    if wrapper and vision == "keep":
        hidden = cut.hidden if cut is not None else list(range(model.config.hidden_size))
        export = with_vision(model, str(teacher), hidden)
    with temp_dir(out) as tmp:
        export.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if cut is not None:
            record = {
                "teacher": teacher,
                "arch": Arch.from_hf_config(model.config).to_dict(),
                "cut": asdict(cut),
            }
            if wrapper:
                record["multimodal"] = {"wrapper": wrapper, "vision": multimodal_note(vision)}
            (tmp / CUT_FILE).write_text(json.dumps(record, indent=1))
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        replace_dir(tmp, out)
    return out
