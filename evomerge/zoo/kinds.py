"""The zoo's model kinds, declared here and registered with the core's table (`evomerge.models`)
by the plugin loader (`evomerge.plugins`: the zoo is evomerge's own plugin), so the core looks
them up by a config's `architecture` and never imports zoo code it does not build."""

from __future__ import annotations

from evomerge.models import register_model_kind


def register() -> None:
    """Register the zoo's kinds (again: the same entries are no change)."""
    register_model_kind(
        "DigitsMLP",
        "evomerge.zoo.digits:DigitsMLP.from_config",
        load_hint="`evomerge.zoo.digits.DigitsMLP.from_pretrained(DIR)` (a plain torch MLP, not a transformers model)",
    )
