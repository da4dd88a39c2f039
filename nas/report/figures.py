"""The report's plotly figures, one per section (`nas.report.html` lays them out): each takes the
`ReportData` and returns a figure, or None when the study has nothing to show there yet."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from nas.report.frames import OBJECTIVES, ReportData, front_eligible

COLORS = {
    "COMPLETE": "#1f77b4",
    "PRUNED": "#ff7f0e",
    "RUNNING": "#2ca02c",
    "FAIL": "#d62728",
    "WAITING": "#7f7f7f",
}


BUDGET_COLORS = ("#1f77b4", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22")


def pareto_figure(data: ReportData) -> go.Figure | None:
    trials = data.trials
    done = trials[front_eligible(trials)]
    pruned = trials[(trials["state"] == "PRUNED") & trials["value"].notna()]
    if done.empty and pruned.empty:
        return None
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[title for _, title, _ in OBJECTIVES.values()])  # fmt: skip
    teacher_loss = data.header.get("teacher_val_loss")
    budgets = budget_colors(trials)
    for col, (name, (column, _, _)) in enumerate(OBJECTIVES.items(), start=1):
        front = done[done[f"pareto_{name}"]].sort_values(column)
        first = col == 1
        fig.add_trace(points(front, column, "front", "lines", "#444", "circle", 0.6, first), 1, col)
        for budget, color in budgets.items():  # the front spans the budgets; colour says which
            mine = done[done["budget"].astype(str) == budget] if budget else done
            on = mine[f"pareto_{name}"].astype(bool)
            label = f"budget {budget}" if budget else "completed"
            fig.add_trace(points(mine[on], column, label, "markers", color, "circle", 1.0, first), 1, col)
            fig.add_trace(
                points(mine[~on], column, f"{label} (dominated)", "markers", color, "circle", 0.3, first),
                1,
                col,
            )
        fig.add_trace(
            points(pruned, column, "pruned (last loss)", "markers", COLORS["PRUNED"], "x", 0.55, first),
            1,
            col,
        )
        if teacher_loss is not None:
            label = {"annotation_text": "teacher"} if first else {}
            fig.add_hline(y=teacher_loss, line_dash="dot", line_color="gray", row=1, col=col, **label)
    fig.update_yaxes(title_text="validation loss", row=1, col=1)
    fig.update_layout(height=460, margin=dict(t=40, l=60, r=20, b=40), legend=dict(orientation="h", y=-0.12))
    return fig


def budget_colors(trials: pd.DataFrame) -> dict[str, str]:
    """Budget label -> colour, in the order the study lists them ("" for a study without budgets)."""
    labels = [str(b) for b in trials["budget"].dropna().unique()] if "budget" in trials else []
    return {b: BUDGET_COLORS[i % len(BUDGET_COLORS)] for i, b in enumerate(labels)} or {
        "": COLORS["COMPLETE"]
    }


def screen_figure(data: ReportData) -> go.Figure | None:
    screen = data.screen[data.screen["loss"].notna()]
    if screen.empty:
        return None
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=["screen loss (pruned, no training) vs parameters", "screen loss vs short-KD loss"])  # fmt: skip
    colors = {str(b): BUDGET_COLORS[i % len(BUDGET_COLORS)] for i, b in enumerate(screen["budget"].unique())}
    for budget, group in screen.groupby("budget", sort=False):
        trained = group["trial"].notna()
        for mask, suffix, opacity in ((trained, "distilled", 1.0), (~trained, "screened only", 0.35)):
            fig.add_trace(go.Scatter(x=group[mask]["params"], y=group[mask]["loss"], mode="markers", opacity=opacity,
                                     name=f"budget {budget}: {suffix}", marker=dict(color=colors[str(budget)], size=8),
                                     text=group[mask]["label"], hovertemplate="<b>%{text}</b><br>params %{x:,}<br>screen loss %{y:.4f}<extra></extra>"), 1, 1)  # fmt: skip
        kd = group[group["kd_loss"].notna()]
        fig.add_trace(go.Scatter(x=kd["loss"], y=kd["kd_loss"], mode="markers", showlegend=False, text=kd["label"],
                                 marker=dict(color=colors[str(budget)], size=9, symbol=["circle" if s == "COMPLETE" else "x" for s in kd["state"]]),
                                 hovertemplate="<b>%{text}</b><br>screen %{x:.4f}<br>short KD %{y:.4f}<extra></extra>"), 1, 2)  # fmt: skip
    fig.update_xaxes(title_text="parameters", row=1, col=1)
    fig.update_yaxes(title_text="screen loss", row=1, col=1)
    fig.update_xaxes(title_text="screen loss", row=1, col=2)
    fig.update_yaxes(title_text="val loss after short KD (x: stopped early)", row=1, col=2)
    fig.update_layout(height=420, margin=dict(t=40, l=60, r=20, b=40), legend=dict(orientation="h", y=-0.15))
    return fig


def points(
    df: pd.DataFrame, column: str, name: str, mode: str, color: str, symbol: str, opacity: float, legend: bool
) -> go.Scatter:
    custom = (
        df[["number", "label", "state", "last_step"]]
        .astype(object)
        .where(df[["number", "label", "state", "last_step"]].notna(), "")
    )
    return go.Scatter(
        x=df[column], y=df["value"], mode=mode, name=name, legendgroup=name, showlegend=legend, opacity=opacity,
        marker=dict(color=color, symbol=symbol, size=9), line=dict(color=color), customdata=custom.to_numpy(),
        hovertemplate="trial %{customdata[0]}: <b>%{customdata[1]}</b><br>%{customdata[2]} at step %{customdata[3]}"
        "<br>x=%{x:,}<br>val loss=%{y:.4f}<extra></extra>",
    )  # fmt: skip


def curves_figure(data: ReportData) -> go.Figure | None:
    curves = data.curves
    if curves.empty:
        return None
    fig = go.Figure()
    shown: set[str] = set()
    for trial, df in curves.groupby("trial", sort=True):
        state = df["state"].iloc[0]
        fig.add_trace(go.Scatter(
            x=df["step"], y=df["val_loss"], mode="lines+markers", name=state.lower(), legendgroup=state,
            showlegend=state not in shown, line=dict(color=COLORS.get(state, "#7f7f7f"), width=1.5), marker=dict(size=4),
            opacity=0.9 if state == "COMPLETE" else 0.6,
            hovertemplate=f"trial {trial}: <b>{html.escape(str(df['label'].iloc[0]))}</b><br>step %{{x}}<br>val loss %{{y:.4f}}<extra>{state.lower()}</extra>",
        ))  # fmt: skip
        shown.add(state)
    stops = curves[curves["state"] == "PRUNED"].groupby("trial").tail(1)
    if len(stops):
        fig.add_trace(go.Scatter(x=stops["step"], y=stops["val_loss"], mode="markers", name="pruned here",
                                 marker=dict(symbol="x", size=11, color=COLORS["PRUNED"]), hoverinfo="skip"))  # fmt: skip
    if data.header.get("teacher_val_loss") is not None:
        fig.add_hline(
            y=data.header["teacher_val_loss"], line_dash="dot", line_color="gray", annotation_text="teacher"
        )
    fig.update_layout(
        height=420,
        xaxis_title="distillation step",
        yaxis_title="validation loss",
        margin=dict(t=20, l=60, r=20, b=40),
    )
    return fig


def stability_figure(data: ReportData) -> go.Figure | None:
    s = data.stability
    if len(s) < 2:
        return None
    tau = data.stability_facts.get("kendall_tau")
    colors = budget_colors(data.trials)  # ranks are within each budget; the colour says which
    n = int(max(s["half_rank"].max(), s["full_rank"].max()))
    fig = go.Figure(
        go.Scatter(
            x=[1, n],
            y=[1, n],
            mode="lines",
            line=dict(dash="dot", color="gray"),
            name="same rank",
            hoverinfo="skip",
        )
    )
    fig.add_trace(go.Scatter(
        x=s["half_rank"], y=s["full_rank"], mode="markers+text", text=s["trial"].astype(str), textposition="top center",
        marker=dict(size=10, color=[colors.get(str(b), COLORS["COMPLETE"]) for b in s["budget"]]), name="trial",
        customdata=s[["label", "half_loss", "full_loss"]].to_numpy(),
        hovertemplate="trial %{text}: <b>%{customdata[0]}</b><br>half: rank %{x} (loss %{customdata[1]:.4f})"
        "<br>full: rank %{y} (loss %{customdata[2]:.4f})<extra></extra>",
    ))  # fmt: skip
    fig.update_layout(height=420, width=520, title=f"Kendall tau = {tau:.3f}" if tau is not None else None, showlegend=False,
                      xaxis=dict(title="rank at half horizon", dtick=1), yaxis=dict(title="rank at full horizon", dtick=1, autorange="reversed"),
                      margin=dict(t=40, l=60, r=20, b=40))  # fmt: skip
    fig.update_xaxes(autorange="reversed")
    return fig


def horizon_figure(data: ReportData) -> go.Figure | None:
    """Rank of each finalist at every rung of the adaptive horizon (tokens on a log axis), per budget."""
    h = data.horizon
    if h.empty:
        return None
    fig = go.Figure()
    for (budget, trial), rows in h.groupby(["budget", "trial"], sort=False):
        fig.add_trace(go.Scatter(
            x=rows["tokens"], y=rows["rank"], mode="lines+markers", name=f"{budget} trial {trial}",
            customdata=rows[["label", "loss"]].to_numpy(),
            hovertemplate="<b>%{customdata[0]}</b><br>%{x:,} tokens: rank %{y} (loss %{customdata[1]:.4f})<extra></extra>",
        ))  # fmt: skip
    fig.update_layout(height=380, xaxis=dict(title="KD tokens per candidate", type="log"),
                      yaxis=dict(title="rank in its budget", dtick=1, autorange="reversed"),
                      margin=dict(t=30, l=60, r=20, b=40))  # fmt: skip
    return fig


def importance_figure(data: ReportData) -> go.Figure | None:
    heads, layers = data.importance_heads, data.importance_layers
    if heads is None or layers is None:
        return None
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=["attention head scores", "block importance 1 - cos(in, out)", "LM loss with the layer removed"])  # fmt: skip
    fig.add_trace(go.Heatmap(z=heads.to_numpy(), x=list(heads.columns), y=list(heads.index), colorscale="Viridis",
                             colorbar=dict(x=0.28, len=0.9), hovertemplate="layer %{y}, head %{x}: %{z:.4g}<extra></extra>"), 1, 1)  # fmt: skip
    fig.add_trace(go.Bar(x=layers["layer"], y=layers["block_importance"], marker_color=COLORS["COMPLETE"],
                         hovertemplate="layer %{x}: BI %{y:.4g}<extra></extra>"), 1, 2)  # fmt: skip
    # markers, not bars: the losses sit far from zero, and their differences are what matters
    fig.add_trace(go.Scatter(x=layers["layer"], y=layers["drop_one_loss"], mode="markers+lines", marker=dict(size=9, color=COLORS["PRUNED"]),
                             line=dict(color=COLORS["PRUNED"], width=1), hovertemplate="without layer %{x}: loss %{y:.4f}<extra></extra>"), 1, 3)  # fmt: skip
    if data.importance_base_loss is not None:
        fig.add_hline(
            y=data.importance_base_loss,
            line_dash="dot",
            line_color="gray",
            row=1,
            col=3,
            annotation_text="whole teacher",
        )
    fig.update_xaxes(title_text="head", row=1, col=1, dtick=1)
    fig.update_xaxes(title_text="layer", row=1, col=2, dtick=1)
    fig.update_xaxes(title_text="layer removed", row=1, col=3, dtick=1)
    fig.update_yaxes(title_text="layer", row=1, col=1, dtick=1, autorange="reversed")
    fig.update_layout(height=420, showlegend=False, margin=dict(t=40, l=60, r=20, b=40))
    return fig


def winner_figure(data: ReportData) -> go.Figure | None:
    curve = data.winner_curve
    if curve.empty:
        return None
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    short = data.curves[data.curves["trial"] == data.header["winner"].get("trial")]
    if len(short):  # the short run it continues from, so the two read as one curve
        fig.add_trace(go.Scatter(x=short["step"], y=short["val_loss"], mode="lines+markers", name="val loss (short run)",
                                 line=dict(color="#9ecae1")), secondary_y=False)  # fmt: skip
    fig.add_trace(go.Scatter(x=curve["step"], y=curve["val_loss"], mode="lines+markers", name="val loss (full distillation)",
                             line=dict(color=COLORS["COMPLETE"])), secondary_y=False)  # fmt: skip
    if curve["val_kl"].notna().any():
        fig.add_trace(go.Scatter(x=curve["step"], y=curve["val_kl"], mode="lines+markers", name="val KL(teacher || student)",
                                 line=dict(dash="dash", color="#7f7f7f")), secondary_y=True)  # fmt: skip
    if data.header.get("teacher_val_loss") is not None:
        fig.add_hline(
            y=data.header["teacher_val_loss"], line_dash="dot", line_color="gray", annotation_text="teacher"
        )
    fig.update_layout(height=380, xaxis_title="distillation step", margin=dict(t=20, l=60, r=60, b=40))
    fig.update_yaxes(title_text="validation loss", secondary_y=False)
    fig.update_yaxes(title_text="KL", secondary_y=True)
    return fig
