"""CMA-ES on pycma (`cma` package), generation by generation behind ask/tell.

- Bounds are pycma's own (`bounds` option, a smooth boundary transformation): every asked genome
  is inside them. Genes whose bound widths differ get per-gene step sizes (`CMA_stds`) in
  proportion to their widths.
- Random numbers come from a numpy Generator seeded from the experiment's seed and handed to
  pycma as its `randn`; pycma's own `seed` option (which reseeds numpy's global RNG) is off.
- `diagonal: true` runs separable CMA-ES (pycma's `CMA_diagonal`) - the choice for genomes of
  thousands of genes, where the full covariance matrix costs O(n^2) memory.
- `restarts: k` is IPOP: when pycma stops, a new run starts from x0 with the population doubled.
- ask/generations: `ask(n)` hands out the pending generation's candidates not handed out yet;
  once all are out it returns [] until the whole generation is told (partial tells are
  buffered), then asks pycma for the next one. Failed candidates get their generation's worst
  value; a generation whose failures leave fewer than two distinct values is dropped (pycma is
  not told: it would read the flat values as convergence) and the next one is drawn from the
  same distribution. Flat-fitness stops (tolfun, tolflatfitness, ...) count only after
  `min_generations` generations.
- State: a versioned pickle of the CMAEvolutionStrategy object (its Generator included) plus the
  pending generation, in the JSON-able state dict.

cma is imported where used, so that listing or validating optimizers does not import it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.evaluate.result import EvalResult
from evomerge.optim.base import Candidate, Optimizer
from evomerge.optim.options import Option
from evomerge.optim.state import decode_array, encode_array, pickle_blob, unpickle_blob

# pycma's stop reasons that come from budgets we manage ourselves, not from convergence.
_OWN_BUDGETS = {"maxfevals", "maxiter", "timeout"}
# Flat-fitness stops, honoured only after `min_generations`: accuracy on a few hundred documents
# is quantized, and a first generation of equal scores is no sign of convergence.
_FLAT = {"tolfun", "tolfunhist", "tolflatfitness", "tolfunrel"}


class GeneratorRandn:
    """pycma's `randn(lam, N)` drawn from a numpy Generator (picklable, unlike a lambda)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES(Optimizer):
    name = "cmaes"
    OPTIONS = {
        "popsize": Option(None, "int", low=2),  # pycma's default 4 + 3 ln(n)
        "sigma0": Option(None, "number", low=0, low_open=True),  # default: a quarter of the median bound width (1.0 when unbounded)
        "diagonal": Option(False, "bool"),
        "restarts": Option(0, "int", low=0),
        "min_generations": Option(10, "int", low=0),
        "incpopsize": Option(2, "int", low=1),
        "cma_options": Option(None, "mapping"),  # extra pycma options, passed through
    }

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        import cma  # noqa: F401  (fail early with the import error if missing)

        opts = self.options
        finite = np.isfinite(self.lower) & np.isfinite(self.upper)
        widths = (self.upper - self.lower)[finite]
        if opts["sigma0"] is not None:
            self.sigma0 = float(opts["sigma0"])
        else:
            self.sigma0 = 0.25 * float(np.median(widths)) if widths.size and np.median(widths) > 0 else 1.0
        if not self.sigma0 > 0:
            raise ConfigError(f"sigma0 must be positive, got {self.sigma0}", field="sigma0")
        if self.x0 is None:
            if not finite.all():
                raise ConfigError("cmaes needs x0 when some bounds are infinite", field="x0")
            self.x0 = (self.lower + self.upper) / 2
        self.stds = None
        if finite.all() and widths.size and widths.min() > 0 and not np.allclose(widths, widths[0]):
            self.stds = widths / float(np.median(widths))
        self.restarts = int(opts["restarts"])
        self.popsize = None if opts["popsize"] is None else int(opts["popsize"])
        self._restart = 0
        self._es = self._new_es(self.popsize)
        self._generation = 0
        self._gen_ids: list[int] = []
        self._gen_x: list[np.ndarray] = []
        self._handed = 0
        self._gen_scores: dict[int, float | None] = {}
        self._done: str | None = None

    # ---- pycma --------------------------------------------------------------------------
    def _new_es(self, popsize: int | None) -> Any:
        import cma

        inopts: dict[str, Any] = {
            "randn": GeneratorRandn(np.random.default_rng(int(self.rng.integers(2**63)))),
            "seed": math.nan,  # never reseed numpy's global RNG
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolflatfitness": 10,  # pycma's default 1 ends quantized-accuracy runs at once
        }
        lower = [None if not math.isfinite(v) else float(v) for v in self.lower]
        upper = [None if not math.isfinite(v) else float(v) for v in self.upper]
        if any(v is not None for v in lower + upper):
            inopts["bounds"] = [lower, upper]
        if popsize is not None:
            inopts["popsize"] = popsize
        if self.options["diagonal"]:
            inopts["CMA_diagonal"] = True
        if self.stds is not None:
            inopts["CMA_stds"] = self.stds.tolist()
        extra = self.options["cma_options"] or {}
        inopts.update(extra)
        try:
            return cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, inopts)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"pycma refused the options: {exc}".replace("\n", " "), field="cma_options") from None

    def natural_batch(self) -> int:
        return int(self._es.popsize)

    def _propose(self, n: int) -> list[Candidate]:
        if self._handed >= len(self._gen_ids):
            if self._gen_ids or self._done is not None:
                return []  # the whole generation is out (wait for its results), or pycma stopped
            self._start_generation()
        take = self._gen_ids[self._handed : self._handed + n]
        out = []
        for offset, cid in enumerate(take):
            x = self._gen_x[self._handed + offset]
            out.append(
                Candidate(
                    id=cid,
                    generation=self._generation,
                    genome=self._clip(np.asarray(x, dtype=np.float64)),
                    meta={"restart": self._restart},
                )
            )
        self._handed += len(take)
        return out

    def _start_generation(self) -> None:
        xs = self._es.ask()
        self._gen_x = [np.asarray(x) for x in xs]
        self._gen_ids = [self._new_id() for _ in xs]
        self._handed = 0
        self._gen_scores = {}

    def _observe(self, candidates: list[Candidate], results: list[EvalResult]) -> None:
        for cand, result in zip(candidates, results, strict=True):
            if cand.id not in self._gen_ids:
                raise ValueError(f"candidate {cand.id} is not of the current cmaes generation")
            self._gen_scores[cand.id] = self.objectives.score(result)
        if len(self._gen_scores) < len(self._gen_ids):
            return
        # The whole generation is in: one pycma tell, in generation order.
        raw = [self._gen_scores[cid] for cid in self._gen_ids]
        gen_x = self._gen_x
        self._generation += 1
        self._gen_ids, self._gen_x, self._gen_scores, self._handed = [], [], {}, 0
        finite = {v for v in raw if v is not None}
        if len(finite) < 2 and None in raw:
            return  # failures leave no ranking: draw the next generation from the same distribution
        self._es.tell(gen_x, [-v for v in self._fill(raw)])
        ignored = _OWN_BUDGETS | (_FLAT if self._es.countiter < int(self.options["min_generations"]) else set())
        stop = {k: v for k, v in self._es.stop().items() if k not in ignored}
        if stop:
            if self._restart < self.restarts:
                self._restart += 1
                self._es = self._new_es(int(self._es.popsize * int(self.options["incpopsize"])))
            else:
                self._done = "cma-es converged (" + ", ".join(f"{k}={v}" for k, v in stop.items()) + ")"

    def _finished(self) -> str | None:
        return self._done if not self._gen_ids else None

    # ---- state --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "es": pickle_blob(self._es, "cma"),
            "restart": self._restart,
            "generation": self._generation,
            "gen_ids": list(self._gen_ids),
            "gen_x": [encode_array(x) for x in self._gen_x],
            "handed": self._handed,
            "gen_scores": {str(k): v for k, v in self._gen_scores.items()},
            "done": self._done,
        }

    def _load_state(self, state: dict) -> None:
        self._es = unpickle_blob(state["es"])
        _rekey_all(self._es)
        self._restart = int(state["restart"])
        self._generation = int(state["generation"])
        self._gen_ids = [int(i) for i in state["gen_ids"]]
        self._gen_x = [decode_array(x) for x in state["gen_x"]]
        self._handed = int(state["handed"])
        self._gen_scores = {int(k): v for k, v in state["gen_scores"].items()}
        self._done = state["done"]



def _rekey_all(es: Any) -> None:
    """Recompute the keys of every pycma SolutionDict in `es` after unpickling.

    pycma keys solutions by `hash(x.tobytes())` (sent, archived, injected and repaired solutions),
    and Python salts bytes hashes per process (PYTHONHASHSEED), so in a fresh process the pickled
    keys no longer match: a tell after resume would miss bounded genotypes and injected solutions.
    """
    from cma.utilities.utils import SolutionDict

    for owner in (es, *(v for v in vars(es).values() if hasattr(v, "__dict__"))):
        for value in list(vars(owner).values()):
            if isinstance(value, SolutionDict):
                _rekey(value)


def _rekey(solutions: Any) -> None:
    unhashed = solutions._unhashed_keys
    moves = {old: solutions.key(x) for old, x in unhashed.items() if isinstance(x, np.ndarray)}
    solutions.data = {moves.get(k, k): v for k, v in solutions.data.items()}
    solutions.data_with_same_key = {moves.get(k, k): v for k, v in solutions.data_with_same_key.items()}
    solutions._unhashed_keys = {moves.get(k, k): v for k, v in unhashed.items()}
