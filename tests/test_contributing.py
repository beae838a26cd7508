"""CONTRIBUTING.md names files to write and tests to copy: every path and test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_file_and_test_contributing_names_exists() -> None:
    text = (REPO / "CONTRIBUTING.md").read_text()
    names = set(re.findall(r"`([\w./-]+\.(?:py|yaml|md)(?:::\w+)?)`", text))
    assert len(names) > 10
    for name in sorted(names):
        path, _, test = name.partition("::")
        if "/" not in path:
            continue  # a bare file name, given with its folder nearby in the text
        assert (REPO / path).is_file(), f"CONTRIBUTING.md names {path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", (REPO / path).read_text(), re.M), f"{path} has no test {test}"
    for module, attr in re.findall(r"`(evomerge/[\w/]+\.py):(\w+)`", text):
        assert re.search(rf"^def {attr}\(", (REPO / module).read_text(), re.M), f"{module} has no {attr}"
