"""The zoo's digits models: small MLPs on scikit-learn's bundled 8x8 digits (no download).

This is the setting of the M2N2 reference experiment (SakanaAI/natural_niches): two
experts of the same architecture, one trained only on the digits 0-4 (``low``) and one
only on 5-9 (``high``); each is right on about half of the test set, and a merge that
keeps both skills is right on nearly all of it.

Data (:func:`load_split`): the 1,797 images of ``sklearn.datasets.load_digits``, pixels
divided by 16 (so in [0, 1]), split once into a stratified 80/20 train/test split with
``random_state=SPLIT_SEED``: 1,437 train and 360 test images, the same every time.

Models (:class:`DigitsMLP`): 64-256-10 with ReLU, 19,210 parameters, saved as
``config.json`` (``{"architecture": "DigitsMLP", "sizes": [64, 256, 10]}``) and
``model.safetensors`` with tensors ``layers.{i}.weight`` ([out, in]) and
``layers.{i}.bias``. Outputs are logits over all ten classes, also for an expert that
never saw half of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from evomerge.errors import SourceError
from evomerge.fsutil import atomic_write, atomic_write_text

SPLIT_SEED = 42
TEST_FRACTION = 0.2
SIZES: tuple[int, ...] = (64, 256, 10)
ARCHITECTURE = "DigitsMLP"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The zoo's digits experts: name -> classes it is trained on.
EXPERT_CLASSES: dict[str, tuple[int, ...]] = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}

Split = Literal["train", "test"]


@cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    for arr in (x_tr, x_te, y_tr, y_te):
        arr.setflags(write=False)
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


def load_split(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """``(X float32 [n, 64] in [0, 1], y int64 [n])`` of the fixed train (1,437) or test (360) split.

    The arrays are read-only and shared between calls; copy them to modify.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split {split!r} is not valid; valid: 'train', 'test'")
    return _splits()[split]


class DigitsMLP(nn.Module):
    """A plain MLP classifier (ReLU between layers, logits out); default 64-256-10."""

    def __init__(self, sizes: Iterable[int] = SIZES):
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        if len(self.sizes) < 2:
            raise ValueError(f"DigitsMLP needs at least two sizes, got {list(self.sizes)}")
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    @torch.no_grad()
    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class per row."""
        x = x if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float32)
        return self(x.float()).argmax(-1).numpy()

    def config(self) -> dict[str, object]:
        return {"architecture": ARCHITECTURE, "sizes": list(self.sizes)}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.config(), indent=2) + "\n")
        return directory

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DigitsMLP:
        """An untrained model of a config written by :meth:`save_pretrained` (`evomerge.models`)."""
        return cls(config["sizes"])

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DigitsMLP:
        """Load a model written by :meth:`save_pretrained` (any sizes)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise SourceError(f"no {CONFIG_NAME} (expected a DigitsMLP directory)", file=str(directory))
        config = json.loads(config_path.read_text())
        if config.get("architecture") != ARCHITECTURE:
            raise SourceError(
                f"architecture is {config.get('architecture')!r}; valid: {ARCHITECTURE!r}",
                file=str(config_path),
                field="architecture",
            )
        model = cls(config["sizes"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        model.eval()
        return model


@dataclass(frozen=True)
class TrainSpec:
    """How an expert is trained: Adam on shuffled minibatches for a fixed number of epochs."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    init_std: float | None = None  # None: PyTorch's default Linear init (from the seeded generator)


def new_model(seed: int, sizes: Iterable[int] = SIZES) -> DigitsMLP:
    """A freshly initialised MLP, drawn from a generator seeded with `seed` (not the global RNG)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        model = DigitsMLP(sizes)
    with torch.no_grad():
        for layer in model.layers:
            # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
            bound = 1.0 / float(layer.in_features) ** 0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def train_expert(
    classes: Iterable[int], seed: int, spec: TrainSpec = TrainSpec()
) -> DigitsMLP:
    """An MLP trained only on the training images whose label is in `classes`.

    Deterministic for a given (classes, seed, spec): the init and the batch order come from
    a generator seeded with `seed`.
    """
    keep = sorted({int(c) for c in classes})
    if not keep or any(c < 0 or c > 9 for c in keep):
        raise ValueError(f"classes must be a non-empty subset of 0..9, got {keep}")
    x_all, y_all = load_split("train")
    mask = np.isin(y_all, keep)
    x = torch.from_numpy(x_all[mask].copy())
    y = torch.from_numpy(y_all[mask].copy())
    model = new_model(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), spec.batch_size):
            idx = order[start : start + spec.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def correct(model: nn.Module, split: Split = "test") -> np.ndarray:
    """1/0 per image of `split`: is the model's argmax the label? (M2N2's per-sample scores)."""
    x, y = load_split(split)
    with torch.no_grad():
        pred = model(torch.from_numpy(x.copy())).argmax(-1).numpy()
    return (pred == y).astype(np.int64)


def accuracy(model: nn.Module, split: Split = "test", classes: Iterable[int] | None = None) -> float:
    """Accuracy on `split`, optionally on the images of `classes` only."""
    hits = correct(model, split)
    if classes is not None:
        _, y = load_split(split)
        hits = hits[np.isin(y, sorted(set(classes)))]
    return float(hits.mean()) if hits.size else 0.0
