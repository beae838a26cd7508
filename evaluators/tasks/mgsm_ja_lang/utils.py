"""Scoring of mgsm_ja_lang: the final number must be right and the response Japanese.

EvoLLM-JP checked the language with a language-identification model; this uses the share of
Japanese script (hiragana, katakana, CJK ideographs) among the letters of the response, which
needs no model download. A response is Japanese when that share is at least JA_SHARE.
"""

from __future__ import annotations

import re

JA_SHARE = 0.5
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
_JA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
_LETTER = re.compile(r"[^\W\d_]")


def final_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def is_japanese(text: str) -> bool:
    letters = _LETTER.findall(text)
    if not letters:
        return False
    return sum(1 for ch in letters if _JA.match(ch)) / len(letters) >= JA_SHARE


def process_results(doc: dict, results: list) -> dict[str, int]:
    response = results[0] if results else ""
    if isinstance(response, list):  # unfiltered generations come as a list per request
        response = response[0] if response else ""
    number = final_number(response)
    right = int(number is not None and abs(number - float(doc["answer_number"])) < 1e-6)
    japanese = int(is_japanese(response))
    return {"ja_exact_match": right * japanese, "exact_match": right, "japanese": japanese}
