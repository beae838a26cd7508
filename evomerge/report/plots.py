"""The report's figures as PNG bytes (matplotlib's Agg canvas; no pyplot, so no global state)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from evomerge.report.data import ParamGrid, StageView, pareto_front, row_ok, short_ref

DPI = 100
MAX_INCHES = 16.0  # long DFS paths and many layer groups shrink to fit instead of growing the page
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def fitness_plot(stage: StageView) -> bytes:
    """Every evaluation's fitness (the population) and the best so far, against evaluations."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot()
    values, best = stage.fitness_series()
    primary = stage.primary_objective
    ax.set_title(f"stage {stage.name} ({stage.kind}): fitness against evaluations")
    if not len(values) or np.all(np.isnan(values)):
        _empty(ax, "no successful evaluations yet")
        return _png(fig)
    x = np.arange(1, len(values) + 1)
    gens = np.array([r.generation for r in stage.search], dtype=np.float64)
    ok = ~np.isnan(values)
    points = ax.scatter(x[ok], values[ok], c=gens[ok], cmap="viridis", s=16, alpha=0.8, label="population (colour: generation)")
    ax.step(x, best, where="post", color="#d62728", linewidth=2, label="best so far")
    failed = ~ok
    if failed.any():
        low = np.nanmin(values)
        ax.scatter(x[failed], np.full(failed.sum(), low), marker="x", color="#444", s=24, label=f"failed ({failed.sum()})")
    if stage.budget:
        ax.axvline(stage.budget, color="#999", linestyle="--", linewidth=1, label=f"budget ({stage.budget})")
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"fitness ({primary}, higher is better)")
    ax.grid(alpha=0.3)
    if len(set(gens[ok].tolist())) > 1:
        fig.colorbar(points, ax=ax, label="generation", pad=0.01, ticks=MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pareto_plot(stage: StageView, objectives: Sequence[str]) -> bytes:
    """Two objectives of a stage: every successful evaluation and the non-dominated front."""
    a, b = objectives[:2]
    rows = [r for r in stage.search if row_ok(r) and a in r.objectives and b in r.objectives]
    fig = Figure(figsize=(5.8, 4.6))
    ax = fig.add_subplot()
    ax.set_title(f"stage {stage.name}: Pareto front")
    if not rows:
        _empty(ax, "no successful evaluations yet")
        return _png(fig)
    points = np.array([[r.objectives[a], r.objectives[b]] for r in rows], dtype=np.float64)
    finite = np.all(np.isfinite(points), axis=1)
    points = points[finite]
    ups = [stage.directions.get(a, True), stage.directions.get(b, True)]
    front = pareto_front(points, ups)
    ax.scatter(points[:, 0], points[:, 1], s=16, color="#9db4d0", label=f"evaluations ({len(points)})")
    ax.plot(points[front, 0], points[front, 1], "-o", color="#d62728", markersize=5, label=f"front ({len(front)})")
    ax.set_xlabel(f"{a} ({'higher' if ups[0] else 'lower'} is better)")
    ax.set_ylabel(f"{b} ({'higher' if ups[1] else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def param_heatmap(grids: Sequence[ParamGrid], title: str) -> bytes:
    """One heat map per merge parameter: models (rows) x layer groups (columns), values written in."""
    n = max(len(grids), 1)
    width = min(MAX_INCHES, max(4.5, 1.0 + 0.9 * max((len(g.columns) for g in grids), default=1)))
    height = min(2 * MAX_INCHES, sum(max(1.4, 0.45 * len(g.rows) + 1.0) for g in grids) or 2.0)
    fig = Figure(figsize=(width + 1.5, height), layout="constrained")
    fig.suptitle(title)
    if not grids:
        _empty(fig.add_subplot(), "the recipe has no numeric merge parameters")
        return _png(fig)
    axes = fig.subplots(n, 1, squeeze=False, height_ratios=[max(1.0, len(g.rows)) for g in grids])[:, 0]
    for ax, grid in zip(axes, grids, strict=True):
        values = np.ma.masked_invalid(grid.values)
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=8, rotation=30 if len(grid.columns) > 6 else 0)
        ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=8)
        ax.set_title(grid.name, fontsize=10, loc="left")
        finite = grid.values[np.isfinite(grid.values)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        if grid.values.size <= 200:
            for i in range(grid.values.shape[0]):
                for j in range(grid.values.shape[1]):
                    v = grid.values[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
        fig.colorbar(image, ax=ax, pad=0.01)
    return _png(fig)


def dfs_path_plot(steps: Sequence[dict], layer_counts: dict[str, int], title: str) -> bytes:
    """The DFS layer path: at each step the source model and layer (marker colour = model), and
    below it the scale of the hidden state entering the step and the running product."""
    models = list(layer_counts)
    for step in steps:
        if step["model"] not in layer_counts:
            models.append(step["model"])
            layer_counts[step["model"]] = step["layer"] + 1
    for step in steps:
        layer_counts[step["model"]] = max(layer_counts[step["model"]], step["layer"] + 1)
    offsets, total = {}, 0
    for model in models:
        offsets[model] = total
        total += layer_counts[model]
    n = len(steps)
    width = min(MAX_INCHES, max(6.0, 1.2 + 0.32 * n))
    fig = Figure(figsize=(width, min(MAX_INCHES, max(3.6, 1.6 + 0.2 * total)) + 1.8), layout="constrained")
    fig.suptitle(title)
    if not steps:
        _empty(fig.add_subplot(), "the recipe has no DFS path")
        return _png(fig)
    ax, ax_scale = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    x = np.arange(1, n + 1)
    y = np.array([offsets[s["model"]] + s["layer"] for s in steps])
    ax.plot(x, y, color="#bbb", linewidth=1, zorder=1)
    for m, model in enumerate(models):
        mask = np.array([s["model"] == model for s in steps])
        ax.axhspan(offsets[model] - 0.5, offsets[model] + layer_counts[model] - 0.5, color=COLORS[m % len(COLORS)], alpha=0.07)
        if mask.any():
            ax.scatter(x[mask], y[mask], color=COLORS[m % len(COLORS)], s=40 if n <= 60 else 12, zorder=2, label=short_ref(model))
    if n <= 60:
        for xi, yi, step in zip(x, y, steps, strict=True):
            ax.annotate(f"×{step['input_scale']:.2f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=6)
    ticks = [offsets[m] + i for m in models for i in range(layer_counts[m])]
    labels = [f"{short_ref(m)} L{i}" for m in models for i in range(layer_counts[m])]
    if total <= 64:
        ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_ylim(-0.7, total - 0.3)
    ax.set_ylabel("source layer")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    scales = [s["input_scale"] for s in steps]
    cumulative = [s["cumulative_scale"] for s in steps]
    # Scales are > 0 and multiply: a log axis, bars drawn from 1 (no scaling) to each step's scale.
    colors = [COLORS[models.index(s["model"]) % len(COLORS)] for s in steps]
    ax_scale.bar(x, np.array(scales) - 1.0, bottom=1.0, color=colors, alpha=0.7, label="input scale")
    ax_scale.plot(x, cumulative, "-", color="#333", linewidth=1, label="running product")
    ax_scale.axhline(1.0, color="#999", linewidth=0.8, linestyle="--")
    log = all(v > 0 for v in [*scales, *cumulative])
    if log:
        ax_scale.set_yscale("log")
        values = [*scales, *cumulative, 1.0]
        ax_scale.set_ylim(min(values) / 1.25, max(values) * 1.25)  # bars from 1 would pin the axis at 1
    ax_scale.set_xlabel("step of the path")
    ax_scale.set_ylabel("scale (log)" if log else "scale")
    ax_scale.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)
