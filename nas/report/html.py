"""One self-contained HTML report per study: `report_frames` (pure data, `nas.report.frames`) -> plotly
figures -> HTML. plotly.js is embedded once; nothing is fetched from the network when it is opened."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from nas.io import HTML_MARK, write_text_atomic
from nas.report.figures import (
    curves_figure,
    horizon_figure,
    importance_figure,
    pareto_figure,
    screen_figure,
    stability_figure,
    winner_figure,
)
from nas.report.frames import ReportData, load_study, pareto_mask, report_frames
from nas.settings.paths import default_report

log = logging.getLogger(__name__)
__all__ = ["ReportData", "pareto_mask", "render_html", "report_frames", "write_report"]

FIGURE_CONFIG = {"displaylogo": False, "responsive": True}
SECTIONS = (
    "pareto",
    "screen",
    "curves",
    "stability",
    "importance",
    "candidates",
    "winner",
    "reproducibility",
)
TABLE_COLUMNS = ["number", "state", "budget", "screen_rank", "screen_loss", "label", "value", "params", "kv_cache_bytes_per_token", "latency_tokens_per_s",
                 "tokens", "last_step", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "pareto_params", "pareto_kv_cache", "pareto_latency", "kd_tokens_per_s", "kd_mfu",
                 "duration_s"]  # fmt: skip


def write_report(
    study_or_storage: optuna.Study | str, study_name: str | None = None, out: str | Path | None = None
) -> Path:
    """Render the report of a study (an `optuna.Study`, or a storage URL plus `study_name`) to `out`
    (default `reports/<study>.html`), written atomically; returns the path."""
    if isinstance(study_or_storage, str):
        if not study_name:
            raise ValueError("write_report needs study_name when given a storage URL")
        study = load_study(study_or_storage, study_name)
    else:
        study = study_or_storage
    out = Path(out or default_report(study.study_name))
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(report_frames(study))
    write_text_atomic(out, text)
    log.info("report of study %s -> %s (%.1f MB)", study.study_name, out, len(text) / 1e6)
    return out


def render_html(data: ReportData) -> str:
    """The whole report as one HTML document (plotly.js inlined once, no external resources)."""
    body = [
        header_html(data),
        section("pareto", "Pareto fronts", pareto_figure(data), data.notes.get("pareto"), PARETO_HELP),
        section("screen", "Screen", screen_figure(data), data.notes.get("screen"), screen_text(data)),
        section(
            "curves",
            "Learning curves",
            curves_figure(data),
            None if len(data.curves) else "No trial has reported a validation loss yet.",
        ),
        section(
            "stability",
            "Ranking stability",
            stability_figure(data),
            data.notes.get("stability"),
            stability_text(data),
        ),
        section("horizon", "Adaptive horizon", horizon_figure(data), data.notes.get("horizon"), horizon_text(data)),
        section("importance", "Teacher importance", importance_figure(data), data.notes.get("importance")),
        section(
            "candidates",
            "Candidates",
            None,
            None if len(data.trials) else "The study has no trial yet.",
            candidates_table(data.trials),
        ),
        section("winner", "Winner", winner_figure(data), data.notes.get("winner"), winner_text(data)),
        section("reproducibility", "Reproducibility", None, None, reproducibility_html(data.reproducibility)),
    ]
    title = html.escape(f"nas report: {data.study_name}")
    return PAGE.format(
        mark=HTML_MARK,
        title=title,
        css=CSS,
        plotlyjs=plotly.offline.get_plotlyjs(),
        body="\n".join(body),
        js=SORT_JS,
    )


def section(sid: str, title: str, fig: go.Figure | None, note: str | None, extra: str = "") -> str:
    parts = [f'<section id="{sid}"><h2>{html.escape(title)}</h2>']
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if extra:
        parts.append(extra)
    if fig is not None:
        parts.append(
            fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=FIGURE_CONFIG)
        )
    parts.append("</section>")
    return "\n".join(parts)


def header_html(data: ReportData) -> str:
    h = data.header
    w = h["winner"]
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(h["trial_counts"].items())) or "none"
    rows = [
        (
            "teacher",
            f"{h['teacher']} ({fmt(h['teacher_params'])} params, val loss {fmt(h['teacher_val_loss'])})",
        ),
        (
            "budget",
            ", ".join(f"{b} ({fmt(n)} params)" for b, n in h["budgets"].items())
            or f"{fmt(h['budget'])} params",
        ),
        ("data", h["data"]),
        ("trials", counts),
        ("tokens spent", f"{fmt(h['tokens_spent'])} (all trials + the winner's full distillation)"),
    ]
    for budget, bw in h.get("winners", {}).items():
        if bw:
            rows.append((f"winner of {budget}", f"trial {bw['trial']}: {bw['label']}, {fmt(bw['params'])} params, "
                                                f"val loss {fmt(bw['loss'])} ({bw['source']})"))  # fmt: skip
    if not h.get("winners") and w:
        delta = w.get("loss_vs_teacher")
        versus = f"; {delta:+.4f} vs the teacher" if delta is not None else ""
        rows.append(("winner", f"trial {w['trial']}: {w['label']}, {fmt(w['params'])} params, "
                               f"val loss {fmt(w['loss'])}{versus} ({w['source']})"))  # fmt: skip
    elif not h.get("winners"):
        rows.append(("winner", "none yet: no trial has completed"))
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rows)
    return f'<header id="header"><h1>nas report: {html.escape(data.study_name)}</h1><dl>{items}</dl></header>'


PARETO_HELP = (
    '<p class="help">Validation loss after the short distillation (lower is better). Joined points are the '
    "non-dominated front; faded points are dominated; crosses are pruned trials at the loss where they "
    "stopped (not comparable, shown apart). Hover a point for its architecture.</p>"
)


def screen_text(data: ReportData) -> str:
    if data.screen.empty:
        return ""
    parts = []
    for budget, f in data.screen_facts.items():
        tau = f"{f['kendall_tau']:.3f}" if f["kendall_tau"] is not None else "n/a"
        parts.append(f"budget {html.escape(budget)}: {f['screened']} screened, {f['rejected']} rejected by a "
                     f"constraint, {f['trained']} distilled, {f['completed']} to the horizon; Kendall tau "
                     f"screen vs short-KD loss = <b>{tau}</b>")  # fmt: skip
    table = data.screen.drop(columns=["kv_cache_bytes_per_token"], errors="ignore")
    return (
        '<p class="help">Every candidate\'s LM loss right after pruning (no training) on a few validation '
        "sequences; the best of each budget were distilled briefly, best first.</p><ul>"
        + "".join(f"<li>{p}</li>" for p in parts)
        + f"</ul><details><summary>all {len(table)} screened candidates</summary>"
        + candidates_table(table.assign(state=table["state"].fillna("screened")), list(table.columns))
        + "</details>"
    )


def stability_text(data: ReportData) -> str:
    f = data.stability_facts
    tau = f.get("kendall_tau")
    tau_text = f"{tau:.3f}" if tau is not None else "n/a"
    stable = {True: "the same winner at both horizons", False: "a different winner at half horizon"}.get(
        f.get("winner_stable"), ""
    )
    budgets = {b: v for b, v in f.get("budgets", {}).items() if b and v["k"] >= 2}
    if len(budgets) > 1:
        taus = "; ".join(f"budget {html.escape(b)}: tau = <b>{v['kendall_tau']:.3f}</b> over {v['k']} trials" + ("" if v["winner_stable"] else " (winner changed)") for b, v in budgets.items())  # fmt: skip
        return (f'<p class="help">Rank of each budget\'s top completed trials at step {f.get("half_step")} (half horizon) '
                f'vs step {f.get("full_step")} (full horizon), within the budget: {taus}. Source: {html.escape(f["source"])}.</p>')  # fmt: skip
    return (f'<p class="help">Rank of the top {f["k"]} completed trials at step {f.get("half_step")} (half horizon) vs step '
            f'{f.get("full_step")} (full horizon); Kendall tau = <b>{tau_text}</b> (1 = same order); {stable}. '
            f'Source: {html.escape(f["source"])}.</p>')  # fmt: skip


def horizon_text(data: ReportData) -> str:
    """Why each budget's horizon stopped, where, and whether its top two are within the noise."""
    lines = []
    for budget, f in data.horizon_facts.items():
        noise = (f"the top two are within the validation noise (margin {f['margin']:.4f}, noise {f['noise']:.4f}): "
                 "either is as good a pick as this data can tell" if f["within_noise"]
                 else f"top-1 margin {fmt(f['margin'])} vs noise {fmt(f['noise'])}")  # fmt: skip
        lines.append(f"<li>{html.escape(budget)}: stopped at {f['tokens']:,} tokens per finalist "
                     f"({f['tokens'] / max(f['first_tokens'], 1):.0f}x the horizon, {f['rungs']} rungs): "
                     f"<b>{html.escape(str(f['stop']))}</b>; Kendall tau with the rung before {fmt(f['tau'])}, with the "
                     f"order predicted at the final tokens {fmt(f.get('crossing_tau'))}; "
                     f"{html.escape(noise)}; pick trial {f['pick']}, {fmt(f['extra_tokens'])} tokens beyond the "
                     "trials</li>")  # fmt: skip
    return ('<p class="help">The finalists keep distilling in rungs of doubling tokens until the order of the '
            "best agrees between consecutive rungs and with the order their fitted power laws predict at the final "
            "distillation's tokens (Kendall tau; swaps within the noise count as ties) or a "
            f"token cap is spent.</p><ul>{''.join(lines)}</ul>") if lines else ""  # fmt: skip


def candidates_table(trials: pd.DataFrame, columns: list[str] | None = None) -> str:
    """The trials (or the `columns` of any frame with a "state") as an HTML table sortable by a click on a
    header (a small inline script); task re-rank scores ("rerank.<task>") come after the lead columns."""
    if trials.empty:
        return ""
    rerank = sorted(c for c in trials if str(c).startswith("rerank."))
    cols = [c for c in (columns or [*TABLE_COLUMNS[:7], *rerank, *TABLE_COLUMNS[7:]]) if c in trials]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    whole = {c for c in cols if c != "value" and integral(trials[c])}  # counts stored as float beside a NaN
    rows = []
    for _, row in trials.iterrows():
        cells = "".join(
            f'<td data-v="{html.escape(sort_key(row[c]))}">{html.escape(fmt(int(row[c]) if c in whole and pd.notna(row[c]) else row[c]))}</td>'
            for c in cols
        )
        rows.append(f'<tr class="{html.escape(str(row["state"]).lower())}">{cells}</tr>')
    return (f'<p class="help">Click a header to sort. Value: val loss at the horizon (pruned: where it stopped). '
            'kd_tokens_per_s / kd_mfu: the steady distillation speed of the trial (its train steps after the warm-up; '
            'no evaluation, no final write) and its model-FLOPs utilisation (2 N_teacher + 6 N_student per token '
            'over the bf16 peak of the GPU).</p>'
            f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')  # fmt: skip


def integral(column: pd.Series) -> bool:
    values = pd.to_numeric(column, errors="coerce").dropna()
    return column.dtype != bool and len(values) == column.notna().sum() and bool((values % 1 == 0).all())


def winner_text(data: ReportData) -> str:
    winners = [w for w in data.header.get("winners", {}).values() if w] or [data.header["winner"]]
    return "".join(one_winner_text(w) for w in winners)


def one_winner_text(w: dict) -> str:
    if not w or w.get("source") != "full distillation":
        return ""
    return (f'<p class="help">Trial {w["trial"]} ({html.escape(str(w["label"]))}, {fmt(w["params"])} params): val loss '
            f'{fmt(w["short_run_loss"])} after the short run, {fmt(w["loss"])} after full distillation; '
            f'saved to <code>{html.escape(str(w.get("dir")))}</code>.{speed_text(w)}</p>')  # fmt: skip


def speed_text(w: dict) -> str:
    """The full distillation's steady speed (its train steps alone), its final write and its kernels."""
    if w.get("kd_tokens_per_s") is None:
        return ""
    mfu = f", MFU {w['kd_mfu']:.1%}" if w.get("kd_mfu") is not None else ""
    write = f"; the final write took {w['write_seconds']:.1f} s" if w.get("write_seconds") is not None else ""
    paths = ", ".join(f"{k}: {v}" for k, v in w.get("kernel_paths", {}).items())
    kernels = f"; kernels: {html.escape(paths)}" if paths else ""
    return f" Steady KD speed {w['kd_tokens_per_s']:,.0f} tokens/s{mfu} (train steps only){write}{kernels}."


def reproducibility_html(rep: dict[str, Any]) -> str:
    facts = {k: v for k, v in rep.items() if k not in ("versions", "config")}
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(fmt(v))}</dd>" for k, v in facts.items())
    versions = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rep["versions"].items()
    )
    config = html.escape(json.dumps(rep["config"], indent=2, sort_keys=True, default=str))
    return (f"<dl>{items}</dl><h3>Package versions</h3><dl>{versions or '<dd>not recorded</dd>'}</dl>"
            f"<h3>Config</h3><pre>{config}</pre>")  # fmt: skip


def fmt(value: Any) -> str:
    """A readable cell: thousands separators for ints, 4 decimals for losses, blanks for missing."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def sort_key(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 24px 40px; color: #222; }
h1 { font-size: 1.6em; margin: 18px 0 8px; } h2 { font-size: 1.25em; margin: 28px 0 6px; } h3 { font-size: 1.05em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 8px 0 14px; }
dt { font-weight: 600; color: #555; } dd { margin: 0; font-family: ui-monospace, monospace; font-size: 0.92em; overflow-wrap: anywhere; }
section { border-top: 1px solid #ddd; }
.note { background: #fff6e0; border-left: 4px solid #ffb000; padding: 6px 10px; }
.help { color: #555; font-size: 0.92em; }
.scroll { overflow-x: auto; max-height: 600px; overflow-y: auto; }
table { border-collapse: collapse; font-size: 0.85em; font-family: ui-monospace, monospace; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #f4f6fa; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
tr.pruned td { color: #a05a00; } tr.fail td { color: #b00; } tr.running td { color: #1a7f1a; }
pre { background: #f7f7f7; padding: 10px; overflow: auto; max-height: 420px; font-size: 0.85em; }
"""

SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var tbody = th.closest("table").tBodies[0], asc = !th.classList.contains("asc");
    th.parentNode.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
    th.classList.add(asc ? "asc" : "desc");
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // blanks last either way
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  });
});
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{mark}<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style>
<script type="text/javascript">{plotlyjs}</script>
</head><body>
{body}
<script>{js}</script>
</body></html>
"""
