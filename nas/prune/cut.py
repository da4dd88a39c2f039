"""Materialise a candidate from the teacher: keep the top-ranked layers, hidden channels, KV groups,
query heads and MLP channels (index selection on the weights; the teacher is never modified)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.errors import ConfigError
from nas.io import replace_dir, temp_dir
from nas.model.arch import Arch, check_prunable, count_params
from nas.prune.importance import Importance
from nas.settings import DEPTH_STRATEGIES

log = logging.getLogger(__name__)

CUT_FILE = "nas_pruning.json"


@dataclass(frozen=True)
class Cut:
    """Which teacher units a candidate keeps (teacher indices, in teacher order)."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]  # per kept layer: kept query heads, grouped by kept KV group
    groups: list[list[int]]  # per kept layer: kept KV groups
    mlp: list[list[int]]  # per kept layer: kept MLP channels
    depth_strategy: str


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def keep_layers(importance: Importance, num_layers: int, depth_strategy: str) -> list[int]:
    """The teacher layers to keep: all but the least important, or all but the best contiguous block."""
    total = importance.layer_loss.numel()
    if depth_strategy not in DEPTH_STRATEGIES:
        raise ConfigError(f"depth strategy {depth_strategy!r} is not one of {', '.join(DEPTH_STRATEGIES)}")
    drop = total - num_layers
    if drop == 0:
        return list(range(total))
    if depth_strategy == "drop-lowest":
        return top_k(importance.layer_loss, num_layers)
    # contiguous: the block whose removal changes the residual stream least (lowest block BI)
    starts = range(0, total - drop + 1)
    best = min(starts, key=lambda s: (float(importance.block_bi[s, s + drop]), s))
    return [i for i in range(total) if not best <= i < best + drop]


def plan_cut(teacher: Arch, arch: Arch, importance: Importance, depth_strategy: str = "drop-lowest") -> Cut:
    """Decide every kept unit of `arch` from the teacher's importance (pure: no weights touched)."""
    check_prunable(teacher, arch)
    importance.check_matches(teacher)
    layers = keep_layers(importance, arch.num_layers, depth_strategy)
    per_group = teacher.heads_per_group
    heads, groups, mlp = [], [], []
    for layer in layers:
        kept_groups = top_k(importance.groups[layer], arch.num_query_groups)
        kept_heads = []
        for g in kept_groups:
            in_group = importance.heads[layer, g * per_group : (g + 1) * per_group]
            kept_heads += [g * per_group + h for h in top_k(in_group, arch.heads_per_group)]
        heads.append(kept_heads)
        groups.append(kept_groups)
        mlp.append(top_k(importance.mlp[layer], arch.ffn_hidden_size))
    hidden = top_k(importance.hidden, arch.hidden_size)
    return Cut(layers, hidden, heads, groups, mlp, depth_strategy)


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


def cut_state_dict(teacher: nn.Module, arch: Arch, cut: Cut) -> dict[str, torch.Tensor]:
    """The candidate's weights: the teacher's tensors with only the kept rows and columns."""
    sd = teacher.state_dict()
    hid = torch.tensor(cut.hidden, dtype=torch.long)
    out = {"model.embed_tokens.weight": _select(sd["model.embed_tokens.weight"], cols=hid)}
    out["model.norm.weight"] = _select(sd["model.norm.weight"], rows=hid)
    # tied: the same (cut) tensor; tie_weights() below makes them one parameter again
    out["lm_head.weight"] = (
        out["model.embed_tokens.weight"]
        if arch.tie_word_embeddings
        else _select(sd["lm_head.weight"], cols=hid)
    )
    for new, old in enumerate(cut.layers):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        q = _unit_rows(cut.heads[new], arch.head_dim)
        kv = _unit_rows(cut.groups[new], arch.head_dim)
        ffn = torch.tensor(cut.mlp[new], dtype=torch.long)
        rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": ffn, "up_proj": ffn}
        for name, tensor in sd.items():
            if not name.startswith(src):
                continue
            local = name[len(src) :]
            module, kind = local.rsplit(".", 1)[0].split(".")[-1], local.rsplit(".", 1)[1]
            if module in rows:
                cols = hid if kind == "weight" else None
                out[dst + local] = _select(tensor, rows=rows[module], cols=cols)
            elif module in ("o_proj", "down_proj"):
                cols = (q if module == "o_proj" else ffn) if kind == "weight" else None
                out[dst + local] = _select(tensor, rows=hid, cols=cols)
            elif module in ("input_layernorm", "post_attention_layernorm"):
                out[dst + local] = _select(tensor, rows=hid)
            else:  # per-head q_norm / k_norm: head_dim is kept
                out[dst + local] = tensor.clone()
    return out


def build_model(teacher: nn.Module, arch: Arch, cut: Cut) -> nn.Module:
    """A fresh HF model of `arch` holding the cut weights, on the teacher's device and dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    types = getattr(teacher.config, "layer_types", None)
    layer_types = [types[i] for i in cut.layers] if types is not None else None
    config = arch.to_hf_config(teacher.config, layer_types=layer_types)
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


def save_pruned(model: nn.Module, out: str | Path, tokenizer: Any = None, teacher: str | None = None) -> Path:
    """`save_pretrained` (safetensors + config [+ tokenizer]) and `nas_pruning.json` with the kept units,
    written into a temp directory that replaces `out` once complete (a failure, e.g. a full disk, leaves
    `out` as it was and no partial directory)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        cut = getattr(model, "nas_cut", None)
        if cut is not None:
            record = {"teacher": teacher, "arch": Arch.from_hf_config(model.config).to_dict(), "cut": asdict(cut)}
            (tmp / CUT_FILE).write_text(json.dumps(record, indent=1))
        replace_dir(tmp, out)
    return out
