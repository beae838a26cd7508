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


def test_every_extension_point_names_a_test_to_copy_that_holds_what_it_names() -> None:
    """Each "## Add ..." section says which test to copy; a class or function it names to copy
    ("**Copy** `MixSpace` and its tests in `tests/test_space_kind.py`") is defined there."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    adds = [s for s in sections if s.startswith("Add ")]
    assert len(adds) >= 5
    for section in adds:
        title = section.splitlines()[0]
        assert "**Copy**" in section and re.search(r"`tests/[\w/]+\.py", section), f"'{title}' names no test to copy"
    named = re.findall(r"\*\*Copy\*\*\s+`(\w+)`[^`]*?in\s+`(tests/[\w/]+\.py)`", text)
    assert ("MixSpace", "tests/test_space_kind.py") in named
    for name, path in named:
        assert re.search(rf"^(class|def) {name}\b", (REPO / path).read_text(), re.M), f"{path} defines no {name}"
