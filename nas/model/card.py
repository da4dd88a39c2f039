"""The model card of an exported winner: a `README.md` with the Hugging Face Hub's YAML front matter.

A user who pushes a winner's folder to the Hub gets a page that says what the model is: `base_model` (the
teacher the family started from), tags, the architecture against the teacher's, what was cut, the tokens
spent, the held-out loss and eval results, the study it came from, and a citation of the Minitron papers
(the recipe nas automates). The front matter follows the Hub's model-card metadata
(https://huggingface.co/docs/hub/model-cards#model-card-metadata) and is written with PyYAML, so any
teacher id or path is quoted correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.errors import ModelError
from nas.io import read_json
from nas.model.arch import Arch
from nas.model.size import count_params

CARD_FILE = "README.md"
TAGS = ("pruned", "distilled", "nas", "minitron")
CITATION = """```bibtex
@article{muralidharan2024compact,
  title   = {Compact Language Models via Pruning and Knowledge Distillation},
  author  = {Muralidharan, Saurav and Sreenivas, Sharath Turuvekere and Joshi, Raviraj and Chochowski,
             Marcin and Patwary, Mostofa and Shoeybi, Mohammad and Catanzaro, Bryan and Kautz, Jan and
             Molchanov, Pavlo},
  journal = {arXiv preprint arXiv:2407.14679},
  year    = {2024}
}
@article{sreenivas2024minitron,
  title   = {LLM Pruning and Distillation in Practice: The Minitron Approach},
  author  = {Sreenivas, Sharath Turuvekere and Muralidharan, Saurav and Joshi, Raviraj and others},
  journal = {arXiv preprint arXiv:2408.11796},
  year    = {2024}
}
```"""


@dataclass
class CardFacts:
    """What a winner's card says. `lineage`: the models it was pruned through, the teacher first (a
    cascaded study's later stages start from the previous winner, not the teacher)."""

    teacher: str  # the original teacher (hub id or path): the card's base_model
    teacher_arch: Arch
    arch: Arch
    study: str
    budget: str
    tokens: int  # training tokens spent on this model (its short run + full distillation)
    val_loss: float | None = None
    teacher_val_loss: float | None = None
    evals: dict[str, float | None] = field(default_factory=dict)  # task -> accuracy
    cut: dict[str, Any] | None = None  # `nas.prune.cut.Cut` as a dict (teacher indices kept)
    lineage: list[str] = field(default_factory=list)
    source_arch: Arch | None = None  # the model it was cut from, when not the teacher (a later cascade stage)
    trial: int | None = None
    nas_version: str = ""


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The Hub's YAML metadata of the card."""
    return {
        "base_model": facts.teacher,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
    }


def _architecture(facts: CardFacts) -> list[str]:
    teacher, arch = facts.teacher_arch, facts.arch
    rows = ["| | teacher | this model |", "|---|---|---|"]
    for knob in (*arch.knobs, "head_dim", "vocab_size"):
        rows.append(f"| `{knob}` | {getattr(teacher, knob)} | {getattr(arch, knob)} |")
    t, s = count_params(teacher), count_params(arch)
    rows.append(f"| parameters | {t:,} | {s:,} ({s / t:.1%}) |")
    return rows


def _cut(facts: CardFacts) -> list[str]:
    """What was removed, in counts (the kept teacher indices are in `nas_pruning.json`)."""
    cut, teacher = facts.cut, facts.source_arch or facts.teacher_arch
    if not cut:
        return ["The kept units are not recorded for this model."]
    layers = cut.get("layers", [])
    dropped = [i for i in range(teacher.num_layers) if i not in layers]
    source = facts.lineage[-1] if facts.source_arch is not None and facts.lineage else facts.teacher
    lines = [
        f"Cut from `{source}`:",
        f"- layers: kept {len(layers)} of {teacher.num_layers}"
        + (f", removed {dropped} ({cut.get('depth_strategy')})" if dropped else ""),
        f"- hidden channels: kept {len(cut.get('hidden', []))} of {teacher.hidden_size}",
    ]
    if cut.get("groups"):
        lines.append(f"- KV groups per layer: kept {len(cut['groups'][0])} of {teacher.num_query_groups}")
    if cut.get("heads"):
        lines.append(f"- query heads per layer: kept {len(cut['heads'][0])} of {teacher.num_attention_heads}")
    if cut.get("experts"):
        lines.append(f"- experts per layer: kept {len(cut['experts'][0])} of {teacher.num_experts}")
    lines.append(f"- FFN width: {facts.arch.ffn_hidden_size} of {teacher.ffn_hidden_size} channels")
    lines.append("Units were ranked by activation importance (Minitron, arXiv 2407.14679 §2).")
    return lines


def _results(facts: CardFacts) -> list[str]:
    lines = [f"- training tokens spent (short search run + full distillation): {facts.tokens:,}"]
    if facts.val_loss is not None:
        which = "the model it was cut from" if facts.source_arch is not None else "teacher"
        teacher = f" ({which}: {facts.teacher_val_loss:.4f})" if facts.teacher_val_loss is not None else ""
        lines.append(f"- held-out LM loss: {facts.val_loss:.4f} nats/token{teacher}")
    for task, acc in facts.evals.items():
        lines.append(f"- {task}: " + ("n/a" if acc is None else f"accuracy {acc:.4f}"))
    return lines


STATELESS_BLOCKS = ("mlp", "moe")  # hybrid block types that keep nothing in transformers' cache


def _loading(facts: CardFacts) -> list[str]:
    """A hybrid student whose first layer keeps no cache state (depth pruning dropped the first Mamba layer):
    transformers 5.25's `Cache.get_seq_length()` asks layer 0, so `generate()` fails there without help
    (`nas.model.compat` mends it inside nas)."""
    types = facts.arch.layer_types
    if not types or types[0] not in STATELESS_BLOCKS:
        return []
    return [
        "## Loading",
        f"The first layer is a `{types[0]}` block, which keeps nothing in transformers' cache. transformers 5.25 "
        "reads the cached length from layer 0, so its `generate()` fails on this model; pass `use_cache=False`, "
        "or run `import nas.model.compat; nas.model.compat.apply()` once before generating (releases without "
        "that break need neither).",
        "",
    ]


def model_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then the body (Markdown)."""
    meta = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    chain = " -> ".join([*facts.lineage, "this model"]) if facts.lineage else f"{facts.teacher} -> this model"
    body = [
        f"# {facts.study}: {facts.arch.describe()}",
        "",
        f"A {count_params(facts.arch):,}-parameter model pruned from `{facts.teacher}` and distilled from it "
        "by nas (the Minitron recipe: importance, a search over candidate "
        "architectures with short distillation, full logit distillation of the winner).",
        "",
        "## Architecture",
        *_architecture(facts),
        "",
        "## What was cut",
        *_cut(facts),
        "",
        *_loading(facts),
        "## Training and results",
        *_results(facts),
        "",
        "## Provenance",
        f"- study: `{facts.study}`, budget {facts.budget}"
        + (f", trial {facts.trial}" if facts.trial is not None else ""),
        f"- pruned through: {chain}",
        f"- nas {facts.nas_version}".rstrip(),
        "",
        "## Citation",
        CITATION,
        "",
    ]
    return f"---\n{meta}---\n\n" + "\n".join(body)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card's text ({} when it has none)."""
    if not text.startswith("---\n"):
        return {}
    head, sep, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {} if sep else {}


def lineage_of(teacher: str) -> list[str]:
    """The models `teacher` was itself pruned from, the original first, then `teacher`: followed through the
    `teacher` each nas-pruned directory records in its `nas_pruning.json` (a hub id ends the chain)."""
    chain = [teacher]
    while len(chain) < 64:  # a chain longer than this is a loop of records, not a family
        record = Path(chain[0]) / "nas_pruning.json"
        if not record.is_file():
            break
        parent = read_json(record, error=ModelError).get("teacher")
        if not parent or parent in chain:
            break
        chain.insert(0, str(parent))
    return chain
