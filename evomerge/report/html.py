"""The report page: one self-contained HTML file (inline CSS, no scripts, no CDN) whose images are
PNG files beside it, so it opens offline from the run directory or a copy of `report/`."""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.report.data import RunView, StageView

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.source td:first-child { color: #1f77b4; } tr.baseline td:first-child { color: #8c564b; }
tr.candidate td:first-child { color: #2ca02c; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; } .warn { color: #a15c00; }
"""


@dataclass
class Image:
    """A plot on the page: its file name (relative to index.html) and what it shows."""

    file: str
    caption: str
    alt: str


@dataclass
class Section:
    title: str
    images: list[Image]
    notes: list[str]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _scores(scores: Mapping[str, float] | None, order: Sequence[str] = ()) -> str:
    if not scores:
        return '<span class="muted">–</span>'
    names = [n for n in order if n in scores] + [n for n in scores if n not in order]
    return "<br>".join(f"{_e(n)}: {fmt(scores[n])}" for n in names)


def render_page(view: RunView, sections: Sequence[Section]) -> str:
    """The whole page as a string."""
    state = _state_text(view)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>evomerge report: {_e(view.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>evomerge report: {_e(view.name)}</h1>",
        f'<p class="muted">{_e(view.run_dir)} · written {_e(_dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))}</p>',
        f"<p><b>{_e(state)}</b></p>",
    ]
    parts += [f'<p class="warn">{_e(note)}</p>' for note in view.notes]
    parts.append(_stage_table(view.stages))
    for section in sections:
        parts.append(f"<h2>{_e(section.title)}</h2>")
        parts += [f'<p class="muted">{_e(note)}</p>' for note in section.notes]
        for image in section.images:
            parts.append(
                f'<figure><img src="{_e(image.file)}" alt="{_e(image.alt)}">'
                f"<figcaption>{_e(image.caption)}</figcaption></figure>"
            )
    parts.append("<h2>Sources, baselines and best candidates</h2>")
    parts.append(_results_table(view))
    preformatted = [
        ("Documents evaluated", "\n".join(view.documents)),
        ("Memory", "\n".join(view.memory)),
        ("Exported best: scores.json", _json(view.best_scores) if view.best_scores else ""),
        ("Exported best: recipe.yaml", view.best_recipe_yaml or ""),
    ]
    for title, text in preformatted:
        if text:
            parts += [f"<h2>{_e(title)}</h2>", f"<pre>{_e(text)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=str)


def _state_text(view: RunView) -> str:
    budget = f" of {view.budget}" if view.budget else ""
    failures = sum(s.failures for s in view.stages)
    tail = f", {failures} failed" if failures else ""
    if view.finished is True:
        return f"Finished: {view.evaluations}{budget} evaluations{tail}."
    if view.finished is False:
        return f"Unfinished (running, stopped or resumable): {view.evaluations}{budget} evaluations so far{tail}."
    return f"{view.evaluations}{budget} evaluations in the ledger{tail} (whether the run has finished is not known)."


def _stage_table(stages: Sequence[StageView]) -> str:
    if not stages:
        return '<p class="muted">No stage has recorded an evaluation yet.</p>'
    head = "<tr><th>stage</th><th>space</th><th>evaluations</th><th>failed</th><th>objectives</th><th>best search</th><th>its holdout</th><th>state</th></tr>"
    rows = [head]
    for stage in stages:
        best = stage.best()
        holdout = stage.holdout_of(best.recipe_hash) if best is not None else None
        order = list(stage.directions)
        budget = f" / {stage.budget}" if stage.budget else ""
        state = {True: "finished", False: "unfinished", None: "–"}[stage.finished]
        objectives = ", ".join(f"{n} ({'max' if up else 'min'})" for n, up in stage.directions.items())
        rows.append(
            f"<tr><td>{_e(stage.name)}</td><td>{_e(stage.kind)}</td><td class=num>{len(stage.search)}{budget}</td>"
            f"<td class=num>{stage.failures}</td><td>{_e(objectives or '–')}</td>"
            f"<td>{_scores(best.objectives if best else None, order)}</td>"
            f"<td>{_scores(holdout.objectives if holdout else None, order)}</td><td>{state}</td></tr>"
        )
    return "<table>" + "\n".join(rows) + "</table>"


def _results_table(view: RunView, top: int = 5) -> str:
    head = "<tr><th>kind</th><th>name</th><th>stage</th><th>search</th><th>holdout</th><th>recipe</th></tr>"
    rows = [head]
    for source in view.sources:
        scored = next((b for b in view.baselines if b.name == source), None)
        kind = "base model" if source == view.base else "stage best" if source.startswith("stage:") else "source"
        rows.append(
            f'<tr class="source"><td>{kind}</td><td>{_e(source)}</td><td>–</td>'
            f"<td>{_scores(scored.search if scored else None)}</td><td>{_scores(scored.holdout if scored else None)}</td><td>–</td></tr>"
        )
    for baseline in view.baselines:
        if baseline.name in view.sources:
            continue
        rows.append(
            f'<tr class="baseline"><td>hand-set</td><td>{_e(baseline.name)}</td><td>–</td>'
            f"<td>{_scores(baseline.search)}</td><td>{_scores(baseline.holdout)}</td><td>{_e(baseline.note) or '–'}</td></tr>"
        )
    for stage in view.stages:
        order = list(stage.directions)
        label, listed = ("front", stage.front()[: 2 * top]) if stage.multi else ("best", stage.top(top))
        for rank, row in enumerate(listed, start=1):
            holdout = stage.holdout_of(row.recipe_hash)
            rows.append(
                f'<tr class="candidate"><td>{label} #{rank}</td><td>candidate {_e(row.candidate_id)} (gen {_e(row.generation)})</td>'
                f"<td>{_e(stage.name)}</td><td>{_scores(row.objectives, order)}</td>"
                f"<td>{_scores(holdout.objectives if holdout else None, order)}</td><td><code>{_e(row.recipe_hash)}</code></td></tr>"
            )
    if len(rows) == 1:
        return '<p class="muted">Nothing to list yet.</p>'
    return "<table>" + "\n".join(rows) + "</table>"
