"""Item response theory for cheap fitness: fit, anchor selection and full-set estimates.

Model (a between-item multidimensional 2PL): every item (document) j belongs to one group g(j)
(its task) and every model i has one ability per group, so

    P(model i answers item j) = sigmoid(a_j * (theta[i, g(j)] - b_j)),   a_j = exp(alpha_j) > 0.

Why this model: the merged candidates of a search trade skills against each other (a weight
that helps one task's expert hurts another's), so one ability per task is needed; a single
latent ability would predict one task's documents from another's. Within a task a 2PL with
positive discriminations is what tinyBenchmarks (Polo et al. 2024) and MERGE^3 use; the priors
(theta ~ N(0, 1) per group, b ~ N(0, 3^2), log a ~ N(0, 0.7^2)) fix the scale, keep items that
every training model answers alike at finite difficulties, and make the fit well posed with the
few dozen models a run has scored in full. Scores are used through a Bernoulli likelihood on
[0, 1] (y log p + (1 - y) log(1 - p)), which is the 2PL's for 0/1 exact-match scores and its
usual extension for graded ones; a group whose scores leave [0, 1] is min-max scaled into it
(the range is kept, and estimates are mapped back). Missing scores (NaN) are left out of the
likelihood, so candidates scored on anchors only still inform the anchors and their abilities
at a refit.

Fit: joint MAP of abilities, difficulties and log-discriminations by L-BFGS with analytic
gradients (deterministic; the seed only jitters the start). After the fit, the abilities of the
training models give a Gaussian prior N(mean, cov + ridge) for new candidates, so anchors of
one task inform the others through the correlation of the skills.

Anchors (per group, counts from `allocate`): tinyBenchmarks' IRT clustering, with each item
embedded as its fitted probability of being answered by each training model (a denoised
response profile: items close in it behave alike across models, whatever their (a, b)
parametrisation). k-means (k-means++ start, seeded restarts) gives k clusters; each gives one
anchor, its item of most Fisher information a^2 p (1 - p) about the ability at the best training
model's ability in the group (`anchor_focus: top`; `mean`: averaged over the training models),
weighted by the cluster's share of the group. Clusters keep the anchors representative (the
anchor mean stays a stratified estimate, and a task whose documents are not one-dimensional is
still covered); the information pick makes the ability estimate sharper than the centroid's
item would, and focusing it on the top keeps anchors from saturating as a search improves
(anchors informative for the average training model are easy ones, which every good candidate
answers, and candidates that all answer every anchor all get one estimate).

Rotating anchors (`draw_anchors`): a fresh draw per group, part uniform and part in proportion
to each item's information at the abilities of the candidates a search is making now.

Estimate of a group's mean score from a candidate's observed items (tinyBenchmarks' p-IRT and
gp-IRT): theta by MAP from every observed item under the ability prior; p-IRT = (sum of the
observed scores + sum of the predicted probabilities of the unobserved items) / group size;
gp-IRT = beta * (weighted anchor mean) + (1 - beta) * p-IRT, where beta per group minimises the
squared error of that blend over the training models with the group fully observed (each
re-estimated from its anchors alone), clipped to [0, 1].

The whole model is a JSON-safe dict (`IrtModel.state_dict`); floats round-trip exactly, so a
resumed run estimates exactly as the interrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from threadpoolctl import threadpool_limits

STATE_VERSION = 1


@dataclass(frozen=True)
class IrtConfig:
    """Priors and numerics of the fit (defaults as described in the module docstring)."""

    theta_sd: float = 1.0
    difficulty_sd: float = 3.0
    log_discrimination_sd: float = 0.7
    ability_ridge: float = 0.1  # added to the fitted abilities' covariance for new candidates
    max_iter: int = 500
    kmeans_restarts: int = 4
    anchor_focus: str = "top"  # where anchors inform most: "top" (best training model) or "mean"


@dataclass
class IrtModel:
    """A fitted model over `len(groups)` items, with its anchors once they are chosen."""

    group_names: list[str]
    groups: np.ndarray  # item -> group index
    difficulty: np.ndarray  # b, per item
    discrimination: np.ndarray  # a, per item
    ability_mean: np.ndarray  # per group
    ability_cov: np.ndarray  # group x group
    ranges: list[tuple[float, float]]  # per group: the (lo, hi) scores were scaled from
    config: IrtConfig = field(default_factory=IrtConfig)
    abilities: np.ndarray | None = None  # training models x groups (MAP)
    anchors: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    anchor_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))  # share of its group
    blend: np.ndarray | None = None  # gp-IRT beta per group

    @property
    def n_items(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ prediction
    def probabilities(self, theta: np.ndarray) -> np.ndarray:
        """P(correct) of every item for abilities `theta` (groups,) or (models, groups)."""
        theta = np.asarray(theta, dtype=np.float64)
        return expit(self.discrimination * (theta[..., self.groups] - self.difficulty))

    def ability(self, observed: Mapping[int, float]) -> np.ndarray:
        """MAP abilities (one per group) from {item index: score}, under the fitted prior."""
        idx = np.fromiter(observed.keys(), dtype=np.int64, count=len(observed))
        y = self._scaled(idx, np.fromiter(observed.values(), dtype=np.float64, count=len(observed)))
        return _map_ability(self, idx, y)

    def estimate(self, observed: Mapping[int, float]) -> dict[str, dict[str, float]]:
        """Per group: `p_irt`, `gp_irt` (= p_irt without anchors or blend), `anchor_mean` and
        `observed` (documents), the means in the scores' own units.

        A group whose every item is observed gets its exact mean in all three estimates.
        """
        theta = self.ability(observed)
        prob = self.probabilities(theta)
        values = prob.copy()
        seen = np.zeros(self.n_items, dtype=bool)
        for j, v in observed.items():
            values[j] = self._scaled(np.array([j]), np.array([v]))[0]
            seen[j] = True
        out: dict[str, dict[str, float]] = {}
        anchor_set = set(self.anchors.tolist())
        for g, name in enumerate(self.group_names):
            members = self.groups == g
            p_irt = float(values[members].mean())
            anchors = [k for k, j in enumerate(self.anchors.tolist()) if self.groups[j] == g]
            full = bool(seen[members].all())
            if anchors and all(seen[self.anchors[k]] for k in anchors):
                w = self.anchor_weights[anchors]
                anchor_mean = float(np.dot(w, values[self.anchors[anchors]]) / w.sum())
            else:
                anchor_mean = p_irt
            beta = float(self.blend[g]) if self.blend is not None else 0.0
            gp = p_irt if full or not anchor_set else beta * anchor_mean + (1 - beta) * p_irt
            if full:
                anchor_mean = p_irt
            lo, hi = self.ranges[g]
            out[name] = {
                "p_irt": _unscale(p_irt, lo, hi),
                "gp_irt": _unscale(gp, lo, hi),
                "anchor_mean": _unscale(anchor_mean, lo, hi),
                "observed": float(seen[members].sum()),
            }
        return out

    def _scaled(self, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.array(y, dtype=np.float64)
        for k, j in enumerate(idx.tolist()):
            lo, hi = self.ranges[self.groups[j]]
            out[k] = _scale(out[k], lo, hi)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-safe: lists of floats and ints (exact round trip through json)."""

        def floats(a: np.ndarray | None) -> list | None:
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {
            "version": STATE_VERSION,
            "group_names": list(self.group_names),
            "groups": self.groups.astype(int).tolist(),
            "difficulty": floats(self.difficulty),
            "discrimination": floats(self.discrimination),
            "ability_mean": floats(self.ability_mean),
            "ability_cov": floats(self.ability_cov),
            "ranges": [[float(lo), float(hi)] for lo, hi in self.ranges],
            "config": asdict(self.config),
            "abilities": floats(self.abilities),
            "anchors": self.anchors.astype(int).tolist(),
            "anchor_weights": floats(self.anchor_weights),
            "blend": floats(self.blend),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> IrtModel:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"IRT state version {state.get('version')!r}, expected {STATE_VERSION}")

        def arr(key: str) -> np.ndarray | None:
            v = state.get(key)
            return None if v is None else np.asarray(v, dtype=np.float64)

        return cls(
            group_names=list(state["group_names"]),
            groups=np.asarray(state["groups"], dtype=np.int64),
            difficulty=arr("difficulty"),
            discrimination=arr("discrimination"),
            ability_mean=arr("ability_mean"),
            ability_cov=arr("ability_cov").reshape(len(state["group_names"]), -1),
            ranges=[(float(lo), float(hi)) for lo, hi in state["ranges"]],
            config=IrtConfig(**state["config"]),
            abilities=arr("abilities"),
            anchors=np.asarray(state["anchors"], dtype=np.int64),
            anchor_weights=arr("anchor_weights"),
            blend=arr("blend"),
        )


# ---------------------------------------------------------------------- fitting
def fit(
    responses: np.ndarray,
    groups: Sequence[str],
    *,
    seed: int,
    config: IrtConfig | None = None,
) -> IrtModel:
    """MAP fit on `responses` (models x items; NaN = not scored) with `groups[j]` naming item j's
    group. Every item needs at least one score; more models than 1."""
    config = config or IrtConfig()
    y_raw = np.asarray(responses, dtype=np.float64)
    if y_raw.ndim != 2 or y_raw.shape[1] != len(groups):
        raise ValueError(f"responses must be models x items ({len(groups)} items), got shape {y_raw.shape}")
    mask = ~np.isnan(y_raw)
    if not mask.any(axis=0).all():
        raise ValueError("every item needs at least one score to be fitted")
    names = list(dict.fromkeys(groups))
    gidx = np.asarray([names.index(g) for g in groups], dtype=np.int64)
    ranges = []
    y = np.where(mask, y_raw, 0.0)
    for g in range(len(names)):
        vals = y_raw[:, gidx == g][mask[:, gidx == g]]
        lo, hi = float(vals.min()), float(vals.max())
        rng_ = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi if hi > lo else lo + 1.0)
        ranges.append(rng_)
        cols = gidx == g
        y[:, cols] = np.where(mask[:, cols], (y[:, cols] - rng_[0]) / (rng_[1] - rng_[0]), 0.0)

    n, n_items = y.shape
    n_groups = len(names)
    onehot = np.zeros((n_items, n_groups))
    onehot[np.arange(n_items), gidx] = 1.0
    theta0, b0 = _start(y, mask, onehot, seed)
    x0 = np.concatenate([theta0.ravel(), b0, np.zeros(n_items)])
    c = config
    maskf = mask.astype(np.float64)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = x[: n * n_groups].reshape(n, n_groups)
        b = x[n * n_groups : n * n_groups + n_items]
        alpha = x[n * n_groups + n_items :]
        a = np.exp(alpha)
        z = a * (theta[:, gidx] - b)
        nll = maskf * (np.logaddexp(0.0, z) - y * z)
        r = maskf * (expit(z) - y)
        g_theta = (r * a) @ onehot + theta / c.theta_sd**2
        g_b = -a * r.sum(axis=0) + b / c.difficulty_sd**2
        g_alpha = (r * z).sum(axis=0) + alpha / c.log_discrimination_sd**2
        value = nll.sum() + 0.5 * (
            (theta**2).sum() / c.theta_sd**2 + (b**2).sum() / c.difficulty_sd**2 + (alpha**2).sum() / c.log_discrimination_sd**2
        )
        return float(value), np.concatenate([g_theta.ravel(), g_b, g_alpha])

    # One BLAS thread: the problem is small, and a threaded BLAS on busy cores makes each L-BFGS
    # step ten times slower.
    with threadpool_limits(1, user_api="blas"):
        res = minimize(objective, x0, jac=True, method="L-BFGS-B", options={"maxiter": c.max_iter, "gtol": 1e-7})
    x = res.x
    theta = x[: n * n_groups].reshape(n, n_groups)
    b = x[n * n_groups : n * n_groups + n_items]
    a = np.exp(x[n * n_groups + n_items :])
    # Joint MAP shrinks the abilities and inflates the discriminations alike; the predictions
    # only see a * (theta - b), so put the scale where it is canonical: the training models'
    # abilities get mean 0 and standard deviation 1 per group.
    mean = theta.mean(axis=0)
    sd = theta.std(axis=0) if n > 1 else np.ones(n_groups)
    sd = np.where(sd > 1e-9, sd, 1.0)
    theta = (theta - mean) / sd
    b = (b - mean[gidx]) / sd[gidx]
    a = a * sd[gidx]
    cov = np.atleast_2d(np.cov(theta, rowvar=False, bias=True)) if n > 1 else np.eye(n_groups)
    cov = cov + c.ability_ridge * np.eye(n_groups)
    mean = np.zeros(n_groups)
    return IrtModel(
        group_names=names, groups=gidx, difficulty=b, discrimination=a, ability_mean=mean,
        ability_cov=cov, ranges=ranges, config=c, abilities=theta,
    )  # fmt: skip


def _start(y: np.ndarray, mask: np.ndarray, onehot: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Abilities from each model's group means, difficulties from each item's mean (logits),
    jittered by the seed."""
    rng = np.random.default_rng(seed)
    counts = mask.astype(np.float64) @ onehot
    model_mean = np.where(counts > 0, (y * mask) @ onehot / np.maximum(counts, 1), 0.5)
    item_mean = (y * mask).sum(axis=0) / mask.sum(axis=0)
    theta = _logit(model_mean)
    spread = theta.std(axis=0, keepdims=True)
    theta = (theta - theta.mean(axis=0, keepdims=True)) / np.where(spread > 0, spread, 1.0)
    b = -_logit(item_mean)
    return theta + 0.01 * rng.standard_normal(theta.shape), b + 0.01 * rng.standard_normal(b.shape)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.02, 0.98)
    return np.log(p / (1 - p))


def _scale(v: float, lo: float, hi: float) -> float:
    return v if (lo, hi) == (0.0, 1.0) else float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))


def _unscale(v: float, lo: float, hi: float) -> float:
    return v if (lo, hi) == (0.0, 1.0) else lo + v * (hi - lo)


def _map_ability(model: IrtModel, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Newton's method on the (convex) negative log posterior of one model's abilities."""
    prec = np.linalg.inv(model.ability_cov)
    mean = model.ability_mean
    theta = mean.copy()
    g_of = model.groups[idx]
    a = model.discrimination[idx]
    b = model.difficulty[idx]
    n_groups = len(mean)
    for _ in range(100):
        p = expit(a * (theta[g_of] - b))
        grad = np.bincount(g_of, weights=a * (p - y), minlength=n_groups) + prec @ (theta - mean)
        hess = np.diag(np.bincount(g_of, weights=a * a * p * (1 - p), minlength=n_groups)) + prec
        step = np.linalg.solve(hess, grad)
        step = np.clip(step, -1.0, 1.0)
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    return theta


# ---------------------------------------------------------------------- anchors
def allocate(total: int, weights: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, int]:
    """Anchors per group: `total` split in proportion to `weights` (largest shortfall first), at
    least one per group with a positive weight, at most the group's size (what a full group
    cannot take goes to the others)."""
    out = {g: 0 for g in sizes}
    names = [g for g in sizes if weights.get(g, 0.0) > 0 and sizes[g] > 0]
    if not names:
        return out
    w = np.asarray([weights[g] for g in names], dtype=np.float64)
    share = w / w.sum()
    cap = np.asarray([sizes[g] for g in names])
    counts = np.ones(len(names), dtype=int)
    while counts.sum() < total and (counts < cap).any():
        shortfall = np.where(counts < cap, share * (counts.sum() + 1) - counts, -np.inf)
        counts[int(np.argmax(shortfall))] += 1
    for g, c in zip(names, counts, strict=True):
        out[g] = int(c)
    return out


def choose_anchors(model: IrtModel, counts: Mapping[str, int], *, seed: int, responses: np.ndarray | None = None) -> IrtModel:
    """Set `model.anchors` (k-means on the items' fitted response profiles, per group) and, when
    the training `responses` are given, the gp-IRT blend. Returns the model."""
    if model.abilities is None:
        raise ValueError("choose_anchors needs a fitted model (with its training abilities)")
    profiles = model.probabilities(model.abilities).T  # items x training models
    # Fisher information of each item about its group's ability: at the best training model's
    # ability in the group ("top": a search ranks candidates near its best) or averaged over
    # the training models ("mean").
    if model.config.anchor_focus == "top":
        p_top = model.probabilities(model.abilities.max(axis=0))
        info = model.discrimination**2 * p_top * (1 - p_top)
    else:
        info = (model.discrimination[:, None] ** 2 * profiles * (1 - profiles)).mean(axis=1)
    rng = np.random.default_rng(seed)

    def pick(members: np.ndarray, k: int) -> list[tuple[int, float]]:
        labels, _ = _kmeans(profiles[members], k, rng, model.config.kmeans_restarts)
        clusters = [np.flatnonzero(labels == c) for c in range(k)]
        return [(int(members[c[int(np.argmax(info[members[c]]))]]), len(c) / len(members)) for c in clusters if len(c)]

    return _set_anchors(model, counts, pick, responses)


def draw_anchors(
    model: IrtModel,
    counts: Mapping[str, int],
    abilities: np.ndarray,
    rng: np.random.Generator,
    *,
    spread: float = 0.5,
    responses: np.ndarray | None = None,
) -> IrtModel:
    """Set `model.anchors` to a fresh draw of `counts[group]` items per group, without replacement:
    with probability `spread` uniform over the group and `1 - spread` in proportion to each item's
    Fisher information a^2 p (1 - p) averaged over `abilities` (models x groups: the candidates the
    search is making now). Items every such candidate answers alike (all right or all wrong) carry
    no information about how they differ, so a draw moves to the items at their ability as the
    search improves (or falls); the uniform share keeps every item observed now and then, so refits
    keep learning all of them. Each anchor weighs 1/k of its group; the gp-IRT blend is fitted
    again for this anchor set when the training `responses` are given. Returns the model."""
    theta = np.atleast_2d(np.asarray(abilities, dtype=np.float64))
    p = model.probabilities(theta)
    info = (model.discrimination**2 * p * (1 - p)).mean(axis=0)

    def pick(members: np.ndarray, k: int) -> list[tuple[int, float]]:
        w = info[members]
        share = w / w.sum() if w.sum() > 0 else np.full(len(members), 1.0 / len(members))
        prob = spread / len(members) + (1.0 - spread) * share
        return [(int(j), 1.0 / k) for j in rng.choice(members, size=k, replace=False, p=prob / prob.sum())]

    return _set_anchors(model, counts, pick, responses)


def _set_anchors(
    model: IrtModel,
    counts: Mapping[str, int],
    pick: Callable[[np.ndarray, int], list[tuple[int, float]]],
    responses: np.ndarray | None,
) -> IrtModel:
    """`pick(members, k)` -> [(item, weight)] for each group in order (k = its count, capped at its
    size; groups with none are skipped); the model's anchors sorted, and the gp-IRT blend."""
    chosen: list[tuple[int, float]] = []
    for g, name in enumerate(model.group_names):
        members = np.flatnonzero(model.groups == g)
        k = int(min(counts.get(name, 0), len(members)))
        if k > 0:
            chosen += pick(members, k)
    order = np.argsort([j for j, _ in chosen], kind="stable")
    model.anchors = np.asarray([j for j, _ in chosen], dtype=np.int64).reshape(-1)[order]
    model.anchor_weights = np.asarray([w for _, w in chosen], dtype=np.float64).reshape(-1)[order]
    model.blend = None if responses is None else _blend(model, np.asarray(responses, dtype=np.float64))
    return model


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int) -> tuple[np.ndarray, np.ndarray]:
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(max(1, restarts)):
        centers = _kmeans_pp(x, k, rng)
        labels = np.zeros(len(x), dtype=np.int64)
        for _ in range(100):
            d = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
            labels = np.argmin(d, axis=1)
            new = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else centers[c] for c in range(k)])
            if np.allclose(new, centers, rtol=0, atol=1e-12):
                break
            centers = new
        inertia = float(((x - centers[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, centers)
    assert best is not None
    return best[1], best[2]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[int(rng.integers(len(x)))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(axis=1) for c in centers], axis=0)
        total = d.sum()
        pick = int(rng.integers(len(x))) if total <= 0 else int(rng.choice(len(x), p=d / total))
        centers.append(x[pick])
    return np.stack(centers)


def _blend(model: IrtModel, responses: np.ndarray) -> np.ndarray:
    """gp-IRT beta per group, fitted on the training models whose group is fully scored."""
    errs: dict[int, list[tuple[float, float]]] = {g: [] for g in range(len(model.group_names))}
    anchors = model.anchors.tolist()
    for row in responses:
        if np.isnan(row[anchors]).any():
            continue
        est = model.estimate({j: float(row[j]) for j in anchors})
        for g, name in enumerate(model.group_names):
            members = model.groups == g
            if np.isnan(row[members]).any():
                continue
            truth = float(row[members].mean())
            errs[g].append((est[name]["anchor_mean"] - truth, est[name]["p_irt"] - truth))
    beta = np.zeros(len(model.group_names))
    for g, pairs in errs.items():
        if len(pairs) < 3:
            continue
        e = np.asarray(pairs)
        diff = e[:, 1] - e[:, 0]
        denom = float((diff**2).sum())
        beta[g] = 0.0 if denom <= 0 else float(np.clip((e[:, 1] * diff).sum() / denom, 0.0, 1.0))
    return beta

