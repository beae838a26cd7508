"""How a method sums its merge weights, declared once for the torch engine and the numpy executor.

Both must divide by the same number, bit for bit. torch's own sum of a short float32 tensor
reduces in an order of its choosing that changes with the count (from five values on it is not
left to right), so the methods sum the weights themselves, left to right in float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def sum_float32(values: Iterable[float]) -> float:
    """The sum of ``values`` taken left to right, each value and partial sum rounded to float32."""
    total = np.float32(0)
    for value in values:
        total = np.float32(total + np.float32(value))
    return float(total)
