"""`evomerge report`: a synthetic run (PS, DFS and a two-objective stage, real recipes from the
search spaces, a real ledger) renders to a page whose every image loads in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.recipe import Recipe
from evomerge.report import write_report
from evomerge.report.data import load_run, pareto_front, ps_parameter_grids
from evomerge.run.ledger import Ledger, LedgerRow
from evomerge.spaces import build_space

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium"


def _row(stage: str, cid: int, gen: int, split: str, genome, recipe: Recipe, objectives: dict, ok: bool = True) -> LedgerRow:
    up = {k: True for k in objectives}
    first = next(iter(objectives.values()))
    now = time.time()
    return LedgerRow(
        seq=0,
        stage=stage,
        candidate_id=cid,
        generation=gen,
        split=split,
        genome=None if genome is None else [float(g) for g in genome],
        recipe_hash=recipe.content_hash(),
        recipe_yaml=recipe.to_yaml(),
        objectives=objectives if ok else {k: float("-inf") for k in objectives},
        higher_is_better=up,
        fitness=first if ok else float("-inf"),
        per_sample={k: [1.0, 0.0] for k in objectives} if ok else {},
        worker="w0",
        started=now,
        finished=now + 0.1,
        status="ok" if ok else "failed",
        error=None if ok else "RuntimeError: synthetic failure",
    )


def _stage_rows(ledger: Ledger, space, stage: str, n: int, seed: int, objectives) -> list[LedgerRow]:
    """n search rows of random genomes (every 7th fails), holdout rows for the best two."""
    rng = np.random.default_rng(seed)
    lo, hi = space.bounds[:, 0], space.bounds[:, 1]
    rows = []
    for i in range(n):
        genome = space.x0 if i == 0 else rng.uniform(lo, hi)
        recipe = space.decode(genome)
        scores = {name: float(rng.uniform(0.2, 0.6) + 0.3 * i / n) for name in objectives}
        rows.append(ledger.append(_row(stage, i, i // 4, "search", genome, recipe, scores, ok=i % 7 != 6)))
    best = sorted((r for r in rows if r.ok), key=lambda r: -r.fitness)[:2]
    for row in best:
        recipe = Recipe.from_string(row.recipe_yaml)
        ledger.append(_row(stage, row.candidate_id, row.generation, "holdout", row.genome, recipe, {k: v - 0.05 for k, v in row.objectives.items()}))
    return rows


@pytest.fixture(scope="module")
def spaces(llama_family: dict[str, Path]) -> dict:
    fam = {k: str(v) for k, v in llama_family.items()}
    return {
        "ps": build_space("ps_dare_ties_layerwise", models=[fam["a"], fam["b"], fam["c"]], base=fam["base"], overrides={"layer_groups": 3}),
        "dfs": build_space("dfs", models=[fam["a"], fam["b"]]),
        "pareto": build_space("ps_task_arithmetic", models=[fam["a"], fam["b"]], base=fam["base"]),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, spaces: dict, llama_family: dict[str, Path]) -> Path:
    run = tmp_path_factory.mktemp("runs") / "synthetic"
    run.mkdir()
    fam = {k: str(v) for k, v in llama_family.items()}
    hand_set = {
        "merge_method": "task_arithmetic",
        "base_model": fam["base"],
        "models": [{"model": fam[m], "parameters": {"weight": 0.5}} for m in "abc"],
    }
    stages = [
        {"name": "ps", "space": {"kind": "ps", "method": "dare_ties"}, "evaluator": "zoo_all", "optimizer": {"name": "cmaes"}, "budget": {"evaluations": 30}},
        {"name": "dfs", "space": {"kind": "dfs"}, "evaluator": "zoo_all", "optimizer": {"name": "cmaes"}, "budget": {"evaluations": 16}},
        {"name": "pareto", "space": {"kind": "ps"}, "evaluator": "zoo_all", "optimizer": {"name": "optuna", "sampler": "nsga2", "multi_objective": True}, "budget": {"evaluations": 20}},
    ]
    experiment = {
        "name": "synthetic",
        "models": {"base": fam["base"], "sources": [fam["a"], fam["b"], fam["c"]]},
        "stages": stages,
        "baselines": [{"name": "task_arithmetic λ=0.5", "recipe": hand_set}],
    }
    (run / "experiment.yaml").write_text(yaml.safe_dump(experiment, allow_unicode=True))
    with Ledger.open(run / "ledger.sqlite") as ledger:
        baseline = Recipe.parse(hand_set)
        for split, score in (("search", 0.41), ("holdout", 0.39)):  # as the run scores baselines
            ledger.append(_row("baseline:task_arithmetic λ=0.5", 0, 0, split, None, baseline, {"mean_acc": score}))
        _stage_rows(ledger, spaces["ps"], "ps", 24, seed=1, objectives=["mean_acc"])
        # two objectives recorded, one optimized: no Pareto front for this stage
        dfs_rows = _stage_rows(ledger, spaces["dfs"], "dfs", 16, seed=2, objectives=["mean_acc", "acc_add"])
        _stage_rows(ledger, spaces["pareto"], "pareto", 20, seed=3, objectives=["acc_add", "acc_reverse"])
    best = max((r for r in dfs_rows if r.ok), key=lambda r: r.fitness)
    (run / "best").mkdir()
    (run / "best" / "recipe.yaml").write_text(best.recipe_yaml)
    (run / "best" / "scores.json").write_text(json.dumps({"search": {"mean_acc": best.fitness}}))
    return run


def _image_widths(index: Path) -> dict[str, int]:
    """Open the page in headless Chromium and read every image's naturalWidth after load.

    The page has no scripts of its own; a copy beside it (same folder, so the relative image
    paths resolve) gets a small script and one image that must fail, proving the check sees
    failures."""
    probe = index.with_name("_probe.html")
    script = (
        '<img src="__missing__.png" alt="control"><script>window.addEventListener("load", () => {'
        "const out = document.createElement('pre'); out.id = 'widths';"
        "out.textContent = [...document.images].map(i => i.getAttribute('src') + ' ' + i.naturalWidth).join('\\n');"
        "document.body.appendChild(out);});</script></body>"
    )
    probe.write_text(index.read_text().replace("</body>", script))
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={index.parent / '_chromium'}",
             "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
    finally:
        probe.unlink()
        shutil.rmtree(index.parent / "_chromium", ignore_errors=True)
    found = re.search(r'<pre id="widths">(.*?)</pre>', dom, re.S)
    assert found, f"the probe script did not run; chromium printed: {dom[:500]}"
    widths = dict(line.rsplit(" ", 1) for line in found.group(1).strip().splitlines())
    assert widths.pop("__missing__.png") == "0"
    return {src: int(w) for src, w in widths.items()}


def test_report_page_images_load_in_chromium(run_dir: Path) -> None:
    if CHROMIUM is None:
        pytest.skip(f"chromium is not installed (install it with: {INSTALL_HINT})")
    result = CliRunner().invoke(main, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    index = Path(result.output.strip().splitlines()[-1])
    assert index == run_dir / "report" / "index.html" and index.is_file()
    page = index.read_text()
    assert "http://" not in page and "https://" not in page  # opens offline: nothing remote
    srcs = re.findall(r'<img src="([^"]+)"', page)
    kinds = {re.match(r"[a-z]+", s).group(0) for s in srcs}
    assert kinds == {"fitness", "pareto", "ps", "dfs"}
    assert len([s for s in srcs if s.startswith("fitness_")]) == 3
    assert [s for s in srcs if s.startswith("pareto_")] == ["pareto_03_pareto.png"]
    widths = _image_widths(index)
    assert set(widths) == set(srcs)
    assert all(w > 0 for w in widths.values()), widths
    # the table names the sources and the best candidates with search and holdout scores
    assert "best #1" in page and "holdout" in page and "candidate" in page
    assert "acc_reverse" in page and "synthetic failure" not in page
    assert "task_arithmetic λ=0.5" in page and "mean_acc: 0.4100" in page and "mean_acc: 0.3900" in page
    assert page.count('<tr class="source">') == 4  # base + three fine-tunes
    assert "front #1" in page and "best #1" in page  # the Pareto stage lists its front


def test_report_reads_stages_scores_and_recipes(run_dir: Path) -> None:
    view = load_run(run_dir)
    assert [s.name for s in view.stages] == ["ps", "dfs", "pareto"]
    assert [s.kind for s in view.stages] == ["ps", "dfs", "ps"]
    ps, dfs, pareto = view.stages
    assert len(ps.search) == 24 and ps.failures == 3 and ps.budget == 30  # the baseline rows are not search rows
    assert len(ps.holdout) == 2 and pareto.budget == 20
    (baseline,) = view.baselines
    assert baseline.search == {"mean_acc": 0.41} and baseline.holdout == {"mean_acc": 0.39}
    assert len(view.sources) == 4
    best = ps.best()
    assert best.fitness == max(r.fitness for r in ps.search if r.ok)
    assert ps.holdout_of(best.recipe_hash).objectives["mean_acc"] == pytest.approx(best.fitness - 0.05)
    values, so_far = ps.fitness_series()
    assert np.isnan(values[6]) and np.all(np.diff(so_far[~np.isnan(so_far)]) >= 0)
    assert list(pareto.directions) == ["acc_add", "acc_reverse"] and pareto.multi and not dfs.multi
    front = pareto.front()
    assert front and all(
        not any(o.objectives["acc_add"] >= f.objectives["acc_add"] and o.objectives["acc_reverse"] > f.objectives["acc_reverse"] for o in pareto.ok)
        for f in front
    )
    assert view.best_recipe_yaml and view.best_scores["search"]["mean_acc"] > 0


def test_ps_grids_cover_models_and_layer_groups(spaces: dict) -> None:
    space = spaces["ps"]
    genome = np.linspace(0.1, 0.9, space.dim)
    grids = {g.name: g for g in ps_parameter_grids(space.decode(genome))}
    assert set(grids) == {"weight", "density"}
    weight = grids["weight"]
    assert weight.rows == ["a", "b", "c"] and weight.columns == ["layer 0", "layer 1", "layer 2"]
    # genome layout: per model, per gene, per layer group
    np.testing.assert_allclose(weight.values[0], genome[0:3])
    np.testing.assert_allclose(grids["density"].values[1], genome[9:12])
    filtered = Recipe.from_string(
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
        "  - model: x/m1\n    parameters:\n      weight: [{filter: self_attn, value: [0.1, 0.5, 0.9]}, {value: 0.3}]\n"
    )
    (grid,) = ps_parameter_grids(filtered)
    assert grid.rows == ["m1 [self_attn]", "m1 [other]"] and len(grid.columns) == 3
    np.testing.assert_allclose(grid.values, [[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]])


def test_pareto_front_respects_directions() -> None:
    points = np.array([[1.0, 1.0], [2.0, 0.5], [0.5, 2.0], [0.4, 0.4], [1.5, 0.9]])
    assert pareto_front(points, [True, True]).tolist() == [2, 0, 4, 1]
    assert pareto_front(points, [False, False]).tolist() == [3]


def test_unfinished_run_reports_what_it_has(tmp_path: Path, spaces: dict) -> None:
    run = tmp_path / "early"
    run.mkdir()
    (run / "experiment.yaml").write_text("name: early\n")
    runner = CliRunner()
    alone = runner.invoke(main, ["report", str(run)])  # an experiment file, not a run
    assert alone.exit_code == 2 and "not a run directory" in alone.output and not (run / "report").exists()
    Ledger.open(run / "ledger.sqlite").close()  # as `evomerge run` leaves it before the first evaluation
    empty = runner.invoke(main, ["report", str(run)])  # started, nothing evaluated yet
    assert empty.exit_code == 0, empty.output
    assert "no evaluations yet" in (run / "report" / "index.html").read_text()
    with Ledger.open(run / "ledger.sqlite") as ledger:  # a first stage half done, left open like a live run
        _stage_rows(ledger, spaces["dfs"], "dfs", 3, seed=4, objectives=["mean_acc"])
        index = write_report(run)
    page = index.read_text()
    assert "fitness_01_dfs.png" in page and "dfs_01_dfs.png" in page
    assert (index.parent / "dfs_01_dfs.png").stat().st_size > 0


def test_not_a_run_directory_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not a run directory" in lines[0] and str(tmp_path) in lines[0]
    assert not (tmp_path / "report").exists()
    for other in (tmp_path / "nope", tmp_path / "notes.txt"):
        result = CliRunner().invoke(main, ["report", str(other)])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
