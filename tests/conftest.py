"""Shared fixtures: offline hub, an isolated cache, and small random checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never touch the user's cache (set EVOMERGE_TEST_CACHE to reuse one across runs)."""
    cache = Path(os.environ.get("EVOMERGE_TEST_CACHE") or tmp_path_factory.mktemp("evomerge-cache"))
    os.environ["EVOMERGE_CACHE"] = str(cache)
    return cache


def write_llama(
    path: Path,
    *,
    seed: int,
    layers: int = 3,
    hidden: int = 16,
    intermediate: int = 32,
    vocab: int = 64,
    base: Path | None = None,
    noise: float = 0.05,
    arch: str = "llama",
    tie: bool = False,
    **config_extra,
) -> Path:
    """A random Llama-family checkpoint; with `base`, the base's weights plus seeded noise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kinds = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
    config = AutoConfig.for_model(
        kinds[arch],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **config_extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    base_state = None
    if base is not None:
        base_state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if base_state is not None:
                param.copy_(base_state[name] + noise * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base + three fine-tunes of it, 3 layers, fp32."""
    root = tmp_path_factory.mktemp("llama-family")
    base = write_llama(root / "base", seed=0)
    return {
        "base": base,
        **{name: write_llama(root / name, seed=i + 1, base=base) for i, name in enumerate(("a", "b", "c"))},
    }


@pytest.fixture
def recipe_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the tests that ask for it: started once per test session,
    2 CPUs, bound to 127.0.0.1, dashboard off; shut down at the end. Pools started while it
    runs use it as it is (and must be shut down by their test so the CPUs are free again)."""
    import ray

    from evomerge.run.workers import init_ray

    started = init_ray(num_cpus=2, object_store_memory=512 * 1024**2)
    yield ray
    if started:
        ray.shutdown()
