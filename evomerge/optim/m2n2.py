"""M2N2 (Abrantes, Lange, Tang 2025): model merging with natural niches.

An archive of at most P members, each with a score per training sample (0/1 correctness or a
graded score >= 0, from `EvalResult.per_sample`, tasks concatenated in name order).

- Competition: z_j = sum_k s_kj, shared fitness f_i = sum_j s_ij / z_j^alpha (alpha = 0: a GA).
- Parents: A with probability proportional to f; B proportional to the attraction
  g(A, B) = sum_j max(s_Bj - s_Aj, 0) / z_j^alpha (`attraction: false`: B like A, independently).
- Crossover: split point s and mixing ratio w drawn per child; SLERP(A, B, w) before the split,
  SLERP(A, B, 1 - w) after it (`split: false`: w everywhere; `crossover: false`: the child is A).
- Mutation N(0, mutation_sigma^2) on genomes, for runs from scratch.
- A told child enters the archive unless it has the lowest shared fitness over archive + child;
  it then replaces the member with the lowest (first one on ties). Failed children never enter.

Two representations (`mode`):

- `genome`: members are genomes of the search space (for a weights space, the flat parameter
  vector; SLERP and the split run over the whole vector with one angle, as the reference code).
  The first candidates are the initial members: the `initial` genomes, or `n_init` draws around
  x0 (N(x0, init_sigma^2)) or uniform in the bounds.
- `model`: members are models on disk, referred to as `archive:<id>`. The first candidates are
  `passthrough` recipes of `initial_models`; a child is a `slerp` recipe over two members
  (see `evomerge.optim.m2n2_recipe`), split over the units of `tensor_names`. When a candidate
  enters the archive the optimizer calls `archive_port.persist(member_id, candidate)` (the caller
  materializes the recipe and stores the weights under `<run_dir>/archive/<id>/`); `members()`
  lists the live ids (weights of others may be deleted once a checkpoint without them is
  written) and `lineage(id)` the recipes back to the initial models.

ask(): the initial candidates first; children only once every initial candidate is told (until
then ask returns []). Initial candidates that failed are asked again (drawn genomes are drawn
anew), up to 3 rounds; without enough members then (1 in genome mode, 2 in model mode) the
optimizer stops with the last error. Children asked together are drawn from the same archive; tell updates the
archive one child at a time, in the order told.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.m2n2_recipe import child_recipe, initial_recipe, split_units
from evomerge.optim.options import Option
from evomerge.optim.state import decode_array, encode_array
from evomerge.recipe import Recipe

MODES = ("genome", "model")
INIT_ROUNDS = 3


class ArchivePort(Protocol):
    """What model mode needs from the run: store a member's weights as `archive:<member_id>`."""

    def persist(self, member_id: int, candidate: Candidate) -> None: ...


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Dot product of flat vectors by numpy's pairwise sum, not BLAS: a threaded OpenBLAS `dot`
    spins on busy cores (measured here: 25 ms instead of 4 us for 19,210 genes with the cores
    oversubscribed), which made it the most expensive step of a from-scratch M2N2 run."""
    return float(np.multiply(x, y).sum())


def vector_norm(x: np.ndarray) -> float:
    """Euclidean norm of a flat vector (see `_dot`)."""
    return float(np.sqrt(_dot(x, x)))


def slerp(t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spherical interpolation of two flat vectors with one angle (t = 0: x); linear when nearly
    parallel or when one of them is zero."""
    cx, cy = _slerp_coefficients(x, y)(t)
    return cx * x + cy * y


def flat_slerp_split(
    x: np.ndarray, y: np.ndarray, w: float, split: int | None, norm_x: float | None = None, norm_y: float | None = None
) -> np.ndarray:
    """The M2N2 crossover on flat vectors: SLERP(x, y, w) before index `split`, SLERP(x, y, 1 - w)
    from it on (`split=None`: w everywhere)."""
    coef = _slerp_coefficients(x, y, norm_x, norm_y)
    (ax, ay), (bx, by) = coef(w), coef(1.0 - w)
    s = x.size if split is None else split
    child = np.empty(x.size)
    np.add(ax * x[:s], ay * y[:s], out=child[:s])
    np.add(bx * x[s:], by * y[s:], out=child[s:])
    return child


def _slerp_coefficients(x: np.ndarray, y: np.ndarray, norm_x: float | None = None, norm_y: float | None = None):
    """t -> (coefficient of x, coefficient of y) for SLERP between x and y (one angle)."""
    nx = vector_norm(x) if norm_x is None else norm_x
    ny = vector_norm(y) if norm_y is None else norm_y
    if nx == 0.0 or ny == 0.0:
        return lambda t: (1.0 - t, t)
    omega = float(np.arccos(np.clip(_dot(x, y) / (nx * ny), -1.0, 1.0)))
    sin_omega = float(np.sin(omega))
    if sin_omega <= 1e-6:
        return lambda t: (1.0 - t, t)
    return lambda t: (float(np.sin((1.0 - t) * omega)) / sin_omega, float(np.sin(t * omega)) / sin_omega)


class M2N2(Optimizer):
    name = "m2n2"
    OPTIONS = {
        "mode": Option("genome", "str", choices=MODES, label="m2n2 mode"),
        "archive_size": Option(20, "int", low=2),
        "alpha": Option(1.0, "number", low=0),
        "attraction": Option(True, "bool"),
        "crossover": Option(True, "bool"),
        "split": Option(True, "bool"),
        "mutation_sigma": Option(0.0, "number", low=0),
        "initial": Option(None, "list"),  # genome mode: list of initial genomes
        "n_init": Option(2, "int", low=1),  # genome mode without `initial`: how many initial genomes to draw
        "init_sigma": Option(None, "number", low=0),  # genome mode: draw the initial genomes from N(x0, init_sigma^2)
        "initial_models": Option(None, "list"),  # model mode: model references of the initial members
        "tensor_names": Option(None, "list"),  # model mode: the members' tensor names in checkpoint order
        "archive_port": Option(None, "any"),  # model mode: object with persist(member_id, candidate)
    }
    NEEDS_PER_SAMPLE = True

    @classmethod
    def searches_space(cls, options: dict[str, Any]) -> bool:
        return options.get("mode", "genome") != "model"  # model mode: candidates carry recipes

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        o = self.options  # types and ranges checked against OPTIONS
        self.mode = str(o["mode"])
        self.P = int(o["archive_size"])
        self.alpha = float(o["alpha"])
        self.attraction, self.crossover, self.split = bool(o["attraction"]), bool(o["crossover"]), bool(o["split"])
        self.sigma = float(o["mutation_sigma"])
        self._bounded = bool(np.isfinite(self.lower).any() or np.isfinite(self.upper).any())
        self.port: ArchivePort | None = o["archive_port"]
        if self.mode == "genome":
            self._init_genomes = self._initial_genomes()
            self._init_recipes: list[Recipe] = []
            self.units: list[list[str]] = []
        else:
            self._init_genomes = []
            self._init_recipes, self.units = self._model_mode_setup()
        self.n_init = len(self._init_genomes) + len(self._init_recipes)
        # The archive, in slot order: candidates, per-sample scores [m, N], vector norms.
        self._members: list[Candidate] = []
        self._member_results: list[EvalResult] = []
        self._scores: np.ndarray | None = None
        self._norms: list[float] = []
        self._layout: list[tuple[str, int]] | None = None  # (task, documents) of the per-sample vector
        self._doc_ids: dict[str, list] | None = None
        # Initial members: indices still to ask, in flight, failed this round; failed ones are
        # asked again (drawn genomes redrawn) up to INIT_ROUNDS rounds.
        self._init_todo = list(range(self.n_init))
        self._init_out = 0
        self._init_failed: list[int] = []
        self._init_round = 1
        self._init_error = ""
        self._lineage: dict[int, dict] = {}  # model mode: recipe of every live member's ancestors
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    # ---- set-up -------------------------------------------------------------------------
    def _initial_genomes(self) -> list[np.ndarray]:
        o = self.options
        if o["initial_models"] is not None or o["tensor_names"] is not None:
            raise ConfigError("initial_models and tensor_names are for mode: model", field="mode")
        if o["initial"] is not None:
            genomes = [np.asarray(g, dtype=np.float64).reshape(-1) for g in o["initial"]]
            for i, g in enumerate(genomes):
                if g.shape != (self.dim,):
                    raise ConfigError(f"initial genome {i} has {g.size} genes, the space has {self.dim}", field="initial")
            if not genomes:
                raise ConfigError("initial needs at least one genome", field="initial")
            return [self._clip(g) for g in genomes]
        n = int(o["n_init"])
        if o["init_sigma"] is not None:
            if self.x0 is None:
                raise ConfigError("init_sigma draws around x0; the space gives no x0", field="init_sigma")
        elif not (np.isfinite(self.lower).all() and np.isfinite(self.upper).all()):
            raise ConfigError("m2n2 draws its initial genomes uniformly in the bounds; give finite bounds, init_sigma or initial", field="initial")
        return [self._draw_initial() for _ in range(n)]

    def _draw_initial(self) -> np.ndarray:
        if self.options["init_sigma"] is not None:
            return self._clip(self.x0 + float(self.options["init_sigma"]) * self.rng.standard_normal(self.dim))
        return self.rng.uniform(self.lower, self.upper)

    def _model_mode_setup(self) -> tuple[list[Recipe], list[list[str]]]:
        o = self.options
        refs = o["initial_models"]
        if not refs or len(refs) < 2:
            raise ConfigError("m2n2 model mode needs at least two initial_models (model references)", field="initial_models")
        if not o["tensor_names"]:
            raise ConfigError("m2n2 model mode needs tensor_names (the members' tensors in checkpoint order)", field="tensor_names")
        if self.sigma > 0:
            raise ConfigError("mutation is for genome mode (evolution from scratch); model mode merges only", field="mutation_sigma")
        if not self.crossover:
            raise ConfigError("model mode without crossover would only copy members; keep crossover on", field="crossover")
        if o["initial"] is not None:
            raise ConfigError("initial is for genome mode; model mode takes initial_models", field="initial")
        if self.port is None:
            raise ConfigError("m2n2 model mode needs an archive_port (persist(member_id, candidate))", field="archive_port")
        return [initial_recipe(str(r)) for r in refs], split_units(list(o["tensor_names"]))

    def natural_batch(self) -> int:
        return max(1, len(self._init_todo))

    # ---- ask ----------------------------------------------------------------------------
    def _propose(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        while len(out) < n and self._init_todo:
            k = self._init_todo.pop(0)
            cid = self._new_id()
            meta = {"m2n2": "init", "init_index": k}
            if self.mode == "genome":
                out.append(Candidate(id=cid, generation=0, genome=self._init_genomes[k].copy(), meta=meta))
            else:
                out.append(Candidate(id=cid, generation=0, genome=None, recipe=self._init_recipes[k], meta=meta))
            self._init_out += 1
        if out or self._init_out:
            return out  # children wait until every initial candidate is told
        if self._init_failed and self._init_round < INIT_ROUNDS:
            self._init_round += 1
            self._init_todo, self._init_failed = sorted(self._init_failed), []
            if self.mode == "genome" and self.options["initial"] is None:
                for k in self._init_todo:  # drawn genomes are drawn again
                    self._init_genomes[k] = self._draw_initial()
            return self._propose(n)
        if len(self._members) < (2 if self.mode == "model" else 1):
            self._stop_reason = f"m2n2: the initial members failed {self._init_round} times ({self._init_error})"
            return []
        return [self._child() for _ in range(n)]

    def _fitness(self) -> tuple[np.ndarray, np.ndarray]:
        """Shared-fitness matrix F = s / z^alpha [m, N] and fitness f [m] of the archive."""
        if self._cache is None:
            scores = self._scores
            assert scores is not None
            z = scores.sum(axis=0) ** self.alpha
            z = np.where(z > 0, z, 1.0)
            F = scores / z
            self._cache = (F, F.sum(axis=1))
        return self._cache

    def _select(self) -> tuple[int, int]:
        F, f = self._fitness()
        m = len(self._members)
        probs = f / f.sum() if f.sum() > 0 else np.full(m, 1.0 / m)
        if not self.attraction:
            b, a = self.rng.choice(m, size=2, p=probs)
            return int(a), int(b)
        a = int(self.rng.choice(m, p=probs))
        g = np.maximum(F - F[a], 0.0).sum(axis=1)
        if self.mode == "model":
            g[a] = 0.0
        if g.sum() > 0:
            pb = g / g.sum()
        else:  # A is at least as good as everyone on every sample
            pb = np.ones(m) if self.mode == "genome" or m == 1 else (np.arange(m) != a).astype(float)
            pb /= pb.sum()
        return a, int(self.rng.choice(m, p=pb))

    def _child(self) -> Candidate:
        a, b = self._select()
        if self.mode == "model" and a == b and len(self._members) > 1:
            others = [i for i in range(len(self._members)) if i != a]
            b = int(others[self.rng.integers(len(others))])
        pa, pb = self._members[a], self._members[b]
        cid = self._new_id()
        meta: dict[str, Any] = {"m2n2": "child"}
        if self.mode == "model":
            split = int(self.rng.integers(0, len(self.units))) if self.split else None
            w = float(self.rng.uniform())
            recipe = child_recipe(pa.id, pb.id, self.units, split, w)
            meta.update(w=w, split=split)
            return Candidate(id=cid, generation=cid // self.P, genome=None, recipe=recipe, parents=(pa.id, pb.id), meta=meta)
        x, y = pa.genome, pb.genome
        assert x is not None and y is not None
        if self.crossover:
            split = int(self.rng.integers(0, self.dim)) if self.split else None
            w = float(self.rng.uniform())
            child = flat_slerp_split(x, y, w, split, self._norms[a], self._norms[b])
            meta.update(w=w, split=split)
        else:
            child = x.copy()
        if self.sigma > 0:
            child += self.sigma * self.rng.standard_normal(self.dim)
        if self._bounded:
            child = self._clip(child)
        return Candidate(id=cid, generation=cid // self.P, genome=child, parents=(pa.id, pb.id), meta=meta)

    # ---- tell ---------------------------------------------------------------------------
    def _per_sample(self, result: EvalResult) -> np.ndarray:
        if not result.per_sample:
            raise ConfigError(
                "m2n2 needs per-sample scores; the evaluator returned only objectives "
                f"({', '.join(result.objectives)}) - use an evaluator that reports per_sample",
                field="per_sample",
            )
        layout = [(task, int(np.asarray(result.per_sample[task]).size)) for task in sorted(result.per_sample)]
        if self._layout is None:
            self._layout = layout
            self._doc_ids = {t: list(result.doc_ids.get(t, [])) for t, _ in layout}
        elif layout != self._layout or any(
            result.doc_ids.get(t) and self._doc_ids.get(t) and list(result.doc_ids[t]) != self._doc_ids[t] for t, _ in layout
        ):
            raise ConfigError(
                f"m2n2 compares candidates sample by sample, but this result scores {layout} and the first scored {self._layout}; "
                "evaluate every candidate on the same documents",
                field="per_sample",
            )
        vec = np.concatenate([np.asarray(result.per_sample[t], dtype=np.float64).reshape(-1) for t, _ in layout])
        if not np.isfinite(vec).all() or (vec < 0).any():
            raise ConfigError("m2n2 per-sample scores must be finite and >= 0 (correctness or a graded score)", field="per_sample")
        return vec

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        for cand, result in zip(candidates, results, strict=True):
            if cand.meta.get("m2n2") == "init":
                self._init_out -= 1
                if result.failed:
                    self._init_failed.append(int(cand.meta["init_index"]))
                    self._init_error = result.error or "non-finite objective"
            if result.failed:
                continue  # never enters the archive
            self._offer(cand, result, self._per_sample(result))

    def _offer(self, cand: Candidate, result: EvalResult, vec: np.ndarray) -> None:
        if self._scores is None or len(self._members) < self.P:
            slot = len(self._members)
        else:
            ext = np.vstack([self._scores, vec[None, :]])
            z = ext.sum(axis=0) ** self.alpha
            z = np.where(z > 0, z, 1.0)
            slot = int(np.argmin((ext / z).sum(axis=1)))
            if slot == len(self._members):
                return  # the child is the weakest: it does not enter
        if self.mode == "model":
            assert self.port is not None
            self.port.persist(cand.id, cand)
            assert cand.recipe is not None
            self._lineage[cand.id] = cand.recipe.to_dict()
        light = EvalResult(objectives=dict(result.objectives), higher_is_better=dict(result.higher_is_better), seconds=result.seconds)
        norm = vector_norm(cand.genome) if cand.genome is not None else 0.0
        if slot == len(self._members):
            self._members.append(cand)
            self._member_results.append(light)
            self._norms.append(norm)
            self._scores = vec[None, :].copy() if self._scores is None else np.vstack([self._scores, vec[None, :]])
        else:
            self._members[slot], self._member_results[slot], self._norms[slot] = cand, light, norm
            self._scores[slot] = vec  # type: ignore[index]
        self._cache = None
        if self.mode == "model":
            self._prune_lineage()

    # ---- archive queries ----------------------------------------------------------------
    def members(self) -> list[int]:
        """Ids of the archive members, in slot order."""
        return [c.id for c in self._members]

    def archive(self) -> list[tuple[Candidate, EvalResult, np.ndarray]]:
        """Members with their objectives and per-sample scores."""
        assert self._scores is not None or not self._members
        return [(c, r, self._scores[i].copy()) for i, (c, r) in enumerate(zip(self._members, self._member_results, strict=True))]  # type: ignore[index]

    def best(self) -> tuple[Candidate, EvalResult] | None:
        """The archive member best on the primary objective (what the reference reports)."""
        best = None
        for cand, result in zip(self._members, self._member_results, strict=True):
            score = self.objectives.score(result)
            if score is not None and (best is None or score > best[0]):
                best = (score, cand, result)
        return None if best is None else (best[1], best[2])

    def lineage(self, member_id: int) -> list[tuple[int, Recipe]]:
        """Model mode: (id, recipe) of the member and all its ancestors, ancestors first."""
        order: list[int] = []
        seen: set[int] = set()

        def visit(mid: int) -> None:
            if mid in seen or mid not in self._lineage:
                return
            seen.add(mid)
            for parent in self._lineage[mid].get("evomerge", {}).get("m2n2", {}).get("parents", []):
                visit(int(parent))
            order.append(mid)

        visit(member_id)
        return [(mid, Recipe.model_validate(self._lineage[mid])) for mid in order]

    def _prune_lineage(self) -> None:
        keep: set[int] = set()
        stack = [c.id for c in self._members]
        while stack:
            mid = stack.pop()
            if mid in keep or mid not in self._lineage:
                continue
            keep.add(mid)
            stack.extend(int(p) for p in self._lineage[mid].get("evomerge", {}).get("m2n2", {}).get("parents", []))
        self._lineage = {k: v for k, v in self._lineage.items() if k in keep}

    # ---- state --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "init_genomes": [encode_array(g) for g in self._init_genomes],
            "init_todo": self._init_todo,
            "init_out": self._init_out,
            "init_failed": self._init_failed,
            "init_round": self._init_round,
            "init_error": self._init_error,
            "members": [c.to_dict() for c in self._members],
            "member_results": [r.to_dict() for r in self._member_results],
            "scores": encode_array(self._scores),
            "layout": self._layout,
            "doc_ids": self._doc_ids,
            "lineage": {str(k): v for k, v in self._lineage.items()},
        }

    def _load_state(self, state: dict) -> None:
        self._init_genomes = [decode_array(g) for g in state["init_genomes"]]
        self._init_todo = [int(k) for k in state["init_todo"]]
        self._init_out = int(state["init_out"])
        self._init_failed = [int(k) for k in state["init_failed"]]
        self._init_round = int(state["init_round"])
        self._init_error = state["init_error"]
        self._members = [Candidate.from_dict(c) for c in state["members"]]
        self._member_results = [EvalResult.from_dict(r) for r in state["member_results"]]
        self._scores = decode_array(state["scores"])
        self._norms = [vector_norm(c.genome) if c.genome is not None else 0.0 for c in self._members]
        self._layout = [tuple(x) for x in state["layout"]] if state["layout"] is not None else None  # type: ignore[misc]
        self._doc_ids = state["doc_ids"]
        self._lineage = {int(k): v for k, v in state["lineage"].items()}
        self._cache = None

