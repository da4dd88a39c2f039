"""The [search] fields older studies gave in optimizer steps, converted to tokens on load.

Studies made before commit 882a4c2 (nas 0.1.0, when the horizon and its rungs were set in tokens) give
`search.horizon_steps` (each candidate's short KD) and `search.eval_every` (steps between its validations),
and nas up to commit 229d8a6 still took them as settings (its tiny test study gave them); their TOML files,
the config their databases record and their stored identities keep those names (identities stored by nas
from 882a4c2 to 229d8a6 hold them unset, None, beside the token fields: dropped here). A step
of the short runs is `distill.batch_size x distill.grad_accum x data.seq_len` tokens (what
`nas.search.horizon_plan.tokens_per_step` computes), so N steps become N x that many tokens, and the
horizon resolved from them has the same steps as before: ceil(N x t / t) = N.
"""

from __future__ import annotations

from typing import Any

from nas.settings.data import DataConfig
from nas.settings.train import DistillConfig

# each older [search] field in steps -> the field in tokens that replaced it
STEP_FIELDS = {"horizon_steps": "horizon_tokens", "eval_every": "rung_tokens"}


def search_in_tokens(search: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """`search` (a [search] table as written or recorded) with its older step fields replaced by their
    token fields; a step field left unset (None, as recorded identities hold it) is dropped. ValueError
    when a step field is given beside its token field, or is not a whole number >= 1."""
    out = {k: v for k, v in search.items() if k not in STEP_FIELDS}
    for old, new in STEP_FIELDS.items():
        steps = search.get(old)
        if steps is None:
            continue
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"search.{old} (older studies, in steps) must be a whole number >= 1, got {steps!r}")
        if search.get(new):
            raise ValueError(f"give search.{new} or (older studies) search.{old}, not both")
        out[new] = steps * tokens_per_step
    return out


def study_in_tokens(data: dict[str, Any]) -> dict[str, Any]:
    """A study TOML (or a recorded config) as a dict with its [search] step fields in tokens, a step
    being the study's own batch x accumulation x seq_len (their defaults where the file gives none)."""
    search = data.get("search")
    if not isinstance(search, dict) or not STEP_FIELDS.keys() & search.keys():
        return data
    distill, corpus = data.get("distill"), data.get("data")
    per_step = _field(distill, DistillConfig, "batch_size") * _field(distill, DistillConfig, "grad_accum")
    per_step *= _field(corpus, DataConfig, "seq_len")
    return {**data, "search": search_in_tokens(search, per_step)}


def identity_in_tokens(identity: dict[str, Any]) -> dict[str, Any]:
    """A study's recorded identity (`nas.pipeline.identity.study_identity`) with its search's step fields
    in tokens, a step from the identity's own distill and data settings: what this nas computes for the
    same study, so an older study resumes."""
    search, distill = identity.get("search"), identity.get("distill") or {}
    seq_len = ((identity.get("data") or {}).get("settings") or {}).get("seq_len")
    if not isinstance(search, dict) or not STEP_FIELDS.keys() & search.keys():
        return identity
    per_step = [distill.get("batch_size"), distill.get("grad_accum", 1), seq_len]
    if not all(isinstance(n, int) and n >= 1 for n in per_step):
        return identity  # too old to say; the comparison names what differs
    try:
        return {**identity, "search": search_in_tokens(search, per_step[0] * per_step[1] * per_step[2])}
    except ValueError:
        return identity  # not a study nas wrote; the comparison names what differs


def _field(table: Any, model: type, name: str) -> Any:
    """`name` of a raw TOML table (or a built settings model), else the model's default. A value of the
    wrong type is left for the model's own validation to report: 1 here."""
    value = table.get(name) if isinstance(table, dict) else getattr(table, name, None)
    if value is None:
        return model.model_fields[name].default
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1
