"""The cascade view of a chained study (`nas.cascade`): one self-contained page, `reports/<name>.html`.

- each member's params, held-out loss and tokens (the intermediate cuts of `iterative_step` too);
- the cascade's total tokens against each member one-shot from the teacher and each member from scratch;
- the chain drawn as a picture (params vs held-out loss, an arrow from each model to the one cut from it).

Costs, in words: a member one-shot from the teacher would spend what its stage spent (its search and its
full distillation, the same settings); the chain adds its intermediate stages. Compute is estimated as KD
FLOPs = tokens x (2 N_kd_teacher + 6 N_student) (DESIGN.md, facts at real scale), so a chain whose later
stages distill from smaller teachers costs less per token. From scratch, each member would need the
teacher's own pretraining tokens (`teacher_tokens`; Minitron's comparison, arXiv 2407.14679 §1), unknown
unless given. Each stage's own report (its funnel, trials, importance) is linked.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from nas.cascade.stored import record_from_attrs
from nas.io import HTML_MARK, write_text_atomic
from nas.report.html import CSS, PAGE, SORT_JS, fmt, section
from nas.search.study import check_optuna_schema, check_storage_url, storage_errors

COLUMNS = ["stage", "label", "named", "source", "params", "share", "val_loss", "search_tokens", "final_tokens",
           "tokens", "kd_teacher_params", "kd_flops"]  # fmt: skip


def cascade_frame(record: dict[str, Any]) -> pd.DataFrame:
    """One row per finished stage (the teacher first, as stage 0)."""
    first = record["stages"][0] if record["stages"] else {}
    rows = [
        {"stage": 0, "label": "teacher", "named": True, "source": None, "params": record["teacher_params"],
         "share": 1.0, "val_loss": first.get("teacher_val_loss"), "search_tokens": 0, "final_tokens": 0,
         "tokens": 0, "kd_teacher_params": None, "kd_flops": 0.0}
    ]  # fmt: skip
    for s in record["stages"]:
        params = s["winner"]["params"]
        tokens = int(s["search_tokens"]) + int(s["final_tokens"])
        rows.append(
            {"stage": s["index"], "label": s["label"], "named": s["named"], "source": s["source"],
             "params": params, "share": params / record["teacher_params"], "val_loss": s["winner"]["final_val_loss"],
             "search_tokens": int(s["search_tokens"]), "final_tokens": int(s["final_tokens"]), "tokens": tokens,
             "kd_teacher_params": s["kd_teacher_params"], "kd_flops": kd_flops(tokens, s["kd_teacher_params"], params)}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def kd_flops(tokens: int, teacher_params: int, student_params: int) -> float:
    """Training FLOPs of KD: a teacher forward (2N) and a student forward + backward (6N) per token."""
    return float(tokens) * (2 * teacher_params + 6 * student_params)


def cascade_costs(record: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """The cascade's tokens and KD FLOPs against each member one-shot from the teacher and from scratch."""
    stages = frame[frame.stage > 0]
    members = stages[stages.named]
    teacher = record["teacher_params"]
    one_shot_flops = sum(kd_flops(r.tokens, teacher, r.params) for r in members.itertuples())
    scratch = record.get("teacher_tokens") or 0
    costs = {
        "members": len(members),
        "intermediate": len(stages) - len(members),
        "cascade_tokens": int(stages.tokens.sum()),
        "one_shot_tokens": int(members.tokens.sum()),
        "cascade_flops": float(stages.kd_flops.sum()),
        "one_shot_flops": one_shot_flops,
        "scratch_tokens": scratch * len(members) if scratch else None,
    }
    costs["tokens_vs_one_shot"] = costs["cascade_tokens"] / max(costs["one_shot_tokens"], 1)
    costs["flops_vs_one_shot"] = costs["cascade_flops"] / max(one_shot_flops, 1.0)
    costs["tokens_vs_scratch"] = costs["cascade_tokens"] / costs["scratch_tokens"] if scratch else None
    return costs


def chain_figure(frame: pd.DataFrame) -> go.Figure:
    """The chain: every model at (params, held-out loss), an arrow from each model to the one cut from it."""
    fig = go.Figure()
    for named, symbol, name in ((True, "circle", "members"), (False, "diamond-open", "intermediate cuts")):
        part = frame[frame.named == named]
        fig.add_trace(
            go.Scatter(
                x=part.params, y=part.val_loss, mode="markers+text", name=name, text=part.label,
                textposition="top center", marker={"size": 14, "symbol": symbol},
                customdata=part[["tokens", "stage"]].to_numpy(),
                hovertemplate="stage %{customdata[1]}: %{text}<br>params %{x:,}<br>loss %{y:.4f}"
                "<br>tokens %{customdata[0]:,}<extra></extra>",
            )
        )  # fmt: skip
    by_stage = frame.set_index("stage")
    for row in frame[frame.stage > 0].itertuples():
        src = by_stage.loc[int(row.source)]
        if pd.isna(src.val_loss) or pd.isna(row.val_loss):
            continue
        fig.add_annotation(x=row.params, y=row.val_loss, ax=src.params, ay=src.val_loss, xref="x", yref="y",
                           axref="x", ayref="y", showarrow=True, arrowhead=3, arrowwidth=1.5, opacity=0.7,
                           text="")  # fmt: skip
    fig.update_layout(
        xaxis_title="parameters", yaxis_title="held-out LM loss (nats/token)", height=460,
        margin={"t": 30}, legend={"orientation": "h"},
    )  # fmt: skip
    fig.update_xaxes(type="log")
    return fig


def members_table(frame: pd.DataFrame, record: dict[str, Any]) -> str:
    reports = {s["index"]: s["study"] for s in record["stages"]}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*COLUMNS, "report"])
    rows = []
    for row in frame.to_dict("records"):
        study = reports.get(row["stage"])
        link = f'<a href="{html.escape(study)}.html">{html.escape(study)}</a>' if study else ""
        cells = "".join(
            f'<td data-v="{html.escape(str(row[c]))}">{html.escape(fmt(row[c]))}</td>' for c in COLUMNS
        )
        rows.append(f"<tr>{cells}<td>{link}</td></tr>")
    return f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def costs_html(costs: dict[str, Any]) -> str:
    scratch = (
        f"{costs['scratch_tokens']:,} tokens for {costs['members']} members from scratch (the teacher's "
        f"pretraining tokens each): the cascade costs {costs['tokens_vs_scratch']:.4f}x"
        if costs["scratch_tokens"]
        else "unknown (set teacher_tokens: the tokens the teacher was trained on)"
    )
    items = {
        "cascade (all stages)": f"{costs['cascade_tokens']:,} tokens, {costs['cascade_flops']:.3g} KD FLOPs, "
        f"{costs['members']} members + {costs['intermediate']} intermediate cuts",
        "each member one-shot from the teacher": f"{costs['one_shot_tokens']:,} tokens, "
        f"{costs['one_shot_flops']:.3g} KD FLOPs: the cascade costs {costs['tokens_vs_one_shot']:.3f}x the "
        f"tokens and {costs['flops_vs_one_shot']:.3f}x the FLOPs",
        "each member from scratch": scratch,
    }
    return (
        "<dl>"
        + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items.items())
        + "</dl>"
    )


def render_cascade(record: dict[str, Any]) -> str:
    frame = cascade_frame(record)
    costs = cascade_costs(record, frame)
    how = (
        f"Teacher {record['teacher']}; later stages distilled from the "
        f"{'original teacher' if record['cascade_teacher'] == 'teacher' else 'previous winner'}"
        + (f"; iterative step {record['iterative_step']}" if record.get("iterative_step") else "")
        + f". {len(record['stages'])} of {len(record['plan'])} stages done."
    )
    body = [
        f"<h1>nas cascade: {html.escape(record['name'])}</h1><p>{html.escape(how)}</p>",
        section("members", "Members", None, None, members_table(frame, record)),
        section("costs", "What the cascade cost", None, None, costs_html(costs)),
        section("chain", "The chain", chain_figure(frame) if len(frame) > 1 else None, None),
    ]
    title = html.escape(f"nas cascade: {record['name']}")
    return PAGE.format(
        title=title, mark=HTML_MARK, css=CSS, plotlyjs=plotly.offline.get_plotlyjs(), body="\n".join(body),
        js=SORT_JS,
    )  # fmt: skip


def stored_cascade(storage: str, name: str) -> dict[str, Any] | None:
    """The cascade record (`cascade.json`) that `nas.cascade` keeps on the cascade's own Optuna study, None
    when `name` is not a cascade in `storage` (or the storage does not exist yet)."""
    check_storage_url(storage)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return None
    check_optuna_schema(storage, existing=True)  # never let Optuna write its tables into a file not ours
    with storage_errors(storage):
        if name not in optuna.study.get_all_study_names(storage):
            return None
        return record_from_attrs(optuna.load_study(study_name=name, storage=storage).user_attrs)


def write_cascade_report(record: dict[str, Any], out: str | Path) -> Path:
    """Render the cascade page of `record` (`cascade.json`) to `out`, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, render_cascade(record))
    return out
