"""Sparsification masks for the task-arithmetic family, without a sort per candidate.

TIES, DARE, breadcrumbs and DELLA drop parts of each task vector ``delta = model - base``
before merging. This module decides *which* elements are kept; the merge kernels in
:mod:`evomerge.merge.methods` apply the decision chunk by chunk.

Conventions (shared by both sparsifiers, so their masks are identical):

- **Magnitude rank**: elements of a tensor ordered by ``|delta|`` descending, ties broken by
  the lower flat index first; rank 0 is the largest. "Keep the k largest" keeps ranks
  ``< k``; breadcrumbs keeps a band ``lo <= rank < hi``.
- **Row rank** (DELLA): per row (first dimension; a 1-D tensor is one row), ``|delta|``
  ascending, ties by lower index; 0 is the smallest, as in mergekit.
- **Noise** (DARE, DELLA): ``torch.rand`` in float32 over the flattened tensor, from a
  ``torch.Generator`` seeded by a stable hash of ``(seed, tensor_name, index)``
  (:func:`noise_seed`), so a result does not depend on the order tensors are merged in,
  nor on parallelism. An element is kept when ``u < p``.

Two implementations of the :class:`Sparsifier` protocol:

- :class:`OneShotSparsifier` keeps nothing between calls: for "the k largest" it finds the
  k-th magnitude by an O(N) selection (16-bit deltas: a histogram of their 2^15 possible
  magnitudes; others: a sample brackets the threshold, an exact ``kthvalue`` runs on the
  few elements inside the bracket); DELLA's row ranks are sorted. This is for a single
  merge to disk.
- :class:`CachedSparsifier` is for search, where the same sources are merged thousands of
  times with new densities. Per source key it computes once a magnitude table (16-bit
  deltas: the cumulative histogram of their magnitudes, 128 KiB per tensor; float32 deltas:
  the cumulative histogram of 16-bit keys of their magnitudes, 256 KiB per tensor; small
  or other tensors: the magnitudes sorted, 4 bytes per element), and the row ranks, and per
  noise id the noise; a candidate's magnitude threshold is then a lookup (16-bit, sorted:
  plus one O(N) pass only when the threshold value is tied; float32: plus one O(N) scan that
  ranks the members of the key's bin holding the threshold, unless the whole bin is kept),
  and its mask O(N) elementwise work. Memory is bounded by its
  budget (``budget_bytes``): row ranks (DELLA) and noise (DARE, DELLA) cost 4 bytes per
  element per source (noise per seed, kept for the ``noise_seeds`` most recent seeds), and
  what does not fit is computed per candidate as the one-shot sparsifier does, with the same
  result. Deltas are *not* cached: recomputing ``model - base`` per chunk costs
  ~0.25 ns/element, caching it would cost another 2-4 bytes per element per source.

Everything runs on the delta's device (CPU or an accelerator); noise is always drawn by a
CPU generator and then moved, so masks are identical on every device.

Masks are :class:`Mask` objects evaluated per flat chunk ``[start, stop)`` so that the merge
kernel can work on cache-sized pieces. ``keep`` returns 0/1 tensors (comparisons written as
float arithmetic, ``sign``/``clamp``, which torch vectorizes, instead of boolean tensors,
which are slow). ``apply_`` zeroes the dropped entries of a delta chunk in place; magnitude
masks do that with one fused ``hardshrink`` per threshold (keep ``|d| > thr``), patching
back the few kept elements that equal the threshold.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from evomerge.merge.native import KEEP_ALL, Shrink
from evomerge.merge.specs import della_problem

DeltaFn = Callable[[], Tensor]
NoiseId = tuple[int, str, int]

# Below this many elements a direct kthvalue is cheaper than sampling a bracket.
_DIRECT_SELECT = 1 << 16
_SAMPLE = 1 << 14


def noise_seed(seed: int, tensor_name: str, index: int) -> int:
    """A stable 63-bit generator seed for one (recipe seed, tensor, model index)."""
    digest = hashlib.blake2b(f"{seed}\x00{tensor_name}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_noise(noise_id: NoiseId, numel: int, device: torch.device | str | None = None) -> Tensor:
    """Uniform [0, 1) float32 noise of ``numel`` elements for ``noise_id`` (flat), on ``device``.

    Always drawn by a CPU generator and then moved, so the draws are the same on every device.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(noise_seed(*noise_id))
    noise = torch.rand(numel, generator=gen, dtype=torch.float32)
    return noise if device is None or torch.device(device).type == "cpu" else noise.to(device)


def fresh(delta: DeltaFn) -> bool:
    """Whether ``delta`` returns a new tensor per call that nobody else holds (it says so with
    ``delta.fresh = True``): a sparsifier may then compute |delta| in that tensor's memory."""
    return bool(getattr(delta, "fresh", False))


def _abs_f32(delta: Tensor, owned: bool = False) -> Tensor:
    """|delta| flattened, as float32 (exact for fp16/bf16/fp32), contiguous; in delta's own
    memory when ``owned`` (the caller gives it up) and it is contiguous float32."""
    flat = delta.reshape(-1)
    if owned and flat.dtype == torch.float32 and flat.data_ptr() == delta.data_ptr() and delta.is_contiguous():
        return flat.abs_()
    if flat.dtype == torch.float32:
        return flat.abs()
    if flat.dtype in (torch.float16, torch.bfloat16):
        return flat.abs().float()
    return flat.abs().to(torch.float32)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def sorted_magnitudes(delta: Tensor, *, owned: bool = False) -> Tensor:
    """|delta| flattened and sorted ascending, float32: the k-th largest is ``out[n - k]``.

    Sorted in place by numpy (vectorized quicksort): 3x faster than torch's sort of the int32
    bit patterns and 10x faster than its float sort on one CPU core, with no extra buffer.
    NaN sorts last, after +inf, as with the bit patterns. ``owned``: ``delta`` is a temporary
    the caller gives up, whose memory becomes the table (float32: no second full-size buffer).
    """
    absd = _abs_f32(delta, owned)
    if absd.device.type != "cpu":  # a selection on an accelerator: its own sort
        return torch.sort(absd).values
    if not owned and absd.data_ptr() == delta.data_ptr():  # never sort the caller's tensor
        absd = absd.clone()
    absd.numpy().sort(kind="quicksort")
    return absd


def row_ranks(delta: Tensor, *, owned: bool = False) -> Tensor:
    """Ascending per-row ranks of |delta| (0 = smallest in its row, ties by lower index), flat.
    ``owned``: as for `sorted_magnitudes`."""
    rows = delta.shape[0] if delta.dim() >= 2 else 1
    absd = _abs_f32(delta, owned).view(rows, -1)
    cols = absd.shape[1]
    idx_dtype = _index_dtype(cols)
    order = torch.sort(absd.view(torch.int32), dim=1, stable=True).indices
    ranks = torch.empty((rows, cols), dtype=idx_dtype, device=absd.device)
    arange = torch.arange(cols, dtype=idx_dtype, device=absd.device)
    ranks.scatter_(1, order, arange.expand(rows, cols).contiguous())
    return ranks.view(-1)


# ---- masks ---------------------------------------------------------------------------------


class Mask:
    """Which elements of one tensor's delta to keep, evaluated per flat chunk.

    ``keep(start, stop, delta_chunk)`` returns a 0/1 tensor of ``stop - start`` elements
    (``delta_chunk`` is the flat delta of that chunk, used by masks that test magnitudes).
    ``all_kept`` / ``none_kept`` let a kernel skip the work entirely. A mask reuses its own
    scratch buffers between calls: use one from one thread (see `share_scratch`).
    """

    all_kept: bool = False
    none_kept: bool = False

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def _buf(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._bufs.get((name, dtype, device))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[(name, dtype, device)] = buf
        return buf[:n]

    def keep(self, start: int, stop: int, delta: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def apply_(self, start: int, stop: int, delta: Tensor) -> Tensor:
        """Zero the dropped entries of the flat chunk ``delta`` in place and return it."""
        keep = self.keep(start, stop, delta)
        if keep.dtype != delta.dtype:  # 0/1 in delta's dtype: an op mixing dtypes is not vectorized
            keep = self._buf("keep", stop - start, delta.dtype, delta.device).copy_(keep)
        return delta.mul_(keep)

    def shrink(self, dtype: torch.dtype) -> Shrink | None:
        """This mask as one magnitude threshold with its ties, as compiled kernels apply it to a
        ``dtype`` delta (`native.Shrink`); None when it is not one (noise, bands, row ranks)."""
        return None

    def full(self, delta: Tensor) -> Tensor:
        """The whole mask at once (tests, small tensors): float32 0/1 of delta's shape."""
        flat = delta.reshape(-1)
        if self.all_kept:
            return torch.ones(flat.numel(), dtype=torch.float32, device=delta.device).view(delta.shape)
        if self.none_kept:
            return torch.zeros(flat.numel(), dtype=torch.float32, device=delta.device).view(delta.shape)
        return self.keep(0, flat.numel(), flat).to(torch.float32).clone().view(delta.shape)


def share_scratch(masks: Iterable[Mask | None], scratch: dict | None = None) -> None:
    """Give masks that one thread applies one after another (the models of one merged tensor)
    one set of scratch buffers: a mask's chunk buffer is used up before the next mask runs, so
    N models cost one chunk buffer, not N. ``scratch``: that set (e.g. one thread's, kept
    across the tensors of a merge); default a new one."""
    shared: dict[tuple[str, torch.dtype, torch.device], Tensor] = {} if scratch is None else scratch
    for mask in masks:
        if mask is not None:
            mask._bufs = shared


class KeepAll(Mask):
    all_kept = True

    def shrink(self, dtype: torch.dtype) -> Shrink | None:
        return KEEP_ALL


class KeepNone(Mask):
    none_kept = True


def _band(numel: int, lo: int, hi: int) -> tuple[int, int] | Mask:
    lo, hi = max(0, lo), min(numel, hi)
    if hi <= lo or numel == 0:
        return KeepNone()
    if lo == 0 and hi == numel:
        return KeepAll()
    return lo, hi


def _trivial(keep: float) -> Mask | None:
    """The mask every sparsifier returns for a keep fraction of 1 or more (all) or 0 or less (none)."""
    if keep >= 1:
        return KeepAll()
    if keep <= 0:
        return KeepNone()
    return None


class _Top:
    """The k largest by the rank convention: ``|d| > thr``, or ``|d| == thr`` and among the
    first ``need`` such elements by index (``need`` is None when every element equal to
    ``thr`` is kept).

    ``ties`` holds the (ascending) flat indices of the kept elements equal to ``thr`` once
    known; ``absd_fn`` computes the full |delta| to find them when asked (``cut``). Chunked
    application finds them on the fly instead, in one ascending pass (see ``ThresholdBandMask``).
    """

    def __init__(self, thr: float, n: int, need: int | None = None, ties: Tensor | None = None,
                 absd_fn: Callable[[], Tensor] | None = None):
        self.thr, self.n, self.need, self.ties, self.absd_fn = thr, n, need, ties, absd_fn
        self.seen = 0  # ties met so far in the current ascending pass (chunked application)
        self.next_start = 0
        self._below: dict[torch.dtype, float] = {}
        # hardshrink keeps |d| > lam: with every tie kept, lam is just below thr (`below`)
        self.lam = self.below(torch.float32) if need is None and thr >= 0 else thr

    def below(self, dtype: torch.dtype) -> float:
        """The largest ``dtype`` value under ``thr`` (a magnitude of a ``dtype`` delta):
        hardshrink by it keeps ``|d| >= thr`` in a chunk of that dtype (hardshrink compares in
        the chunk's dtype, so a float32 just below a 16-bit ``thr`` would round up to it)."""
        lam = self._below.get(dtype)
        if lam is None:
            if self.thr <= 0:
                lam = -1.0
            elif dtype in _KEY_FORMATS:
                bits = torch.tensor([self.thr], dtype=dtype).view(torch.int16) - 1
                lam = float(bits.view(dtype)[0])
            else:
                t = torch.tensor(self.thr, dtype=torch.float32)
                lam = float(torch.nextafter(t, torch.tensor(-math.inf, dtype=torch.float32)))
            self._below[dtype] = lam
        return lam

    def lam_for(self, dtype: torch.dtype) -> float:
        """hardshrink's lambda for a ``dtype`` chunk: keeps ``|d| >= thr`` when every tie is kept,
        else ``|d| > thr``."""
        return self.below(dtype) if self.need is None and self.thr >= 0 else self.thr

    def tie_positions(self) -> Tensor:
        if self.ties is None:
            assert self.need is not None and self.absd_fn is not None
            absd = self.absd_fn()
            self.ties = torch.nonzero(absd == self.thr).view(-1)[: self.need].contiguous()
        return self.ties

    @property
    def cut(self) -> int:
        """Ties at indices below ``cut`` are kept."""
        if self.need is None:
            return self.n
        return int(self.tie_positions()[self.need - 1]) + 1


def _top_from_counts(absd_fn: Callable[[], Tensor], thr_t: Tensor, k: int, n_gt: int, n_ge: int, n: int,
                     *, resolve: bool) -> _Top:
    thr = float(thr_t)
    if n_ge == k:
        return _Top(thr, n)
    top = _Top(thr, n, need=k - n_gt, absd_fn=absd_fn)
    if resolve:
        top.tie_positions()
    return top


def select_top(absd: Tensor, k: int) -> _Top:
    """Threshold and tie cut-off for the k largest of ``absd`` (flat float32, 0 < k < N). O(N)."""
    n = absd.numel()
    bits = absd.view(torch.int32)  # non-negative floats order like their bit patterns
    if n <= _DIRECT_SELECT:
        thr_t = torch.kthvalue(absd, n - k + 1).values
        n_gt = int(torch.count_nonzero(absd > thr_t))
        n_ge = int(torch.count_nonzero(absd >= thr_t))
    else:
        thr_t, n_gt, n_ge = _bracket_select(absd, bits, k)
    return _top_from_counts(lambda: absd, thr_t, k, n_gt, n_ge, n, resolve=True)


def lookup_top(ascending: Tensor, k: int, absd_fn: Callable[[], Tensor]) -> _Top:
    """Like :func:`select_top` from sorted magnitudes: a lookup. When the k-th largest value
    is tied with the (k+1)-th, which of the ties are kept is found later (while applying the
    mask, or from ``absd_fn()``)."""
    n = ascending.numel()
    thr_t = ascending[n - k]
    if float(ascending[n - k - 1]) < float(thr_t):
        return _Top(float(thr_t), n)
    n_ge = n - int(torch.searchsorted(ascending, thr_t, side="left"))
    n_gt = n - int(torch.searchsorted(ascending, thr_t, side="right"))
    return _top_from_counts(absd_fn, thr_t, k, n_gt, n_ge, n, resolve=False)


def _bracket_select(absd: Tensor, bits: Tensor, k: int) -> tuple[Tensor, int, int]:
    """k-th largest of absd via a sample bracket; returns (value, count >, count >=)."""
    n = absd.numel()
    step = max(1, n // _SAMPLE)
    sample = absd[::step].contiguous()
    ns = sample.numel()
    frac = k / n
    margin = 4.0 * math.sqrt(max(frac * (1 - frac), 1.0 / ns) * ns) + 8
    j_hi = int(math.floor(frac * ns - margin))  # rank from the top in the sample: larger value
    j_lo = int(math.ceil(frac * ns + margin))
    if j_hi >= 1:
        hi_bits = int(torch.kthvalue(sample, ns - j_hi + 1).values.view(torch.int32))
        gt_hi = bits > hi_bits
        n_above = int(torch.count_nonzero(gt_hi))
    else:
        hi_bits, gt_hi, n_above = None, None, 0
    if j_lo <= ns:
        lo_bits = int(torch.kthvalue(sample, ns - j_lo + 1).values.view(torch.int32))
        ge_lo = bits >= lo_bits
    else:
        ge_lo = None
    need = k - n_above
    if need >= 1:
        if ge_lo is None and gt_hi is None:
            inb = absd
        elif ge_lo is None:
            inb = absd[~gt_hi]
        elif gt_hi is None:
            inb = absd[ge_lo]
        else:
            inb = absd[torch.logical_xor(ge_lo, gt_hi)]
        if need <= inb.numel():
            thr = torch.kthvalue(inb, inb.numel() - need + 1).values
            n_gt = n_above + int(torch.count_nonzero(inb > thr))
            n_ge = n_above + int(torch.count_nonzero(inb >= thr))
            return thr, n_gt, n_ge
    # The sample missed (adversarial layout): exact selection over everything.
    thr = torch.kthvalue(absd, n - k + 1).values
    return thr, int(torch.count_nonzero(absd > thr)), int(torch.count_nonzero(absd >= thr))


class ThresholdBandMask(Mask):
    """Keep ranks in [lo, hi) from thresholds found by selection (no memory kept)."""

    def __init__(self, hi: _Top, lo: _Top | None):
        super().__init__()
        self.hi, self.lo = hi, lo

    def _top(self, top: _Top, start: int, stop: int, absd: Tensor, name: str) -> Tensor:
        out = self._buf(name, stop - start, torch.float32, absd.device)
        torch.sub(absd, top.thr, out=out).sign_()
        if stop <= top.cut:  # every tie in this chunk is kept: |d| >= thr
            out.add_(1).clamp_(0, 1)
        elif start >= top.cut:  # no tie kept: |d| > thr
            out.clamp_(0, 1)
        else:
            split = top.cut - start
            out[:split].add_(1).clamp_(0, 1)
            out[split:].clamp_(0, 1)
        return out

    def keep(self, start: int, stop: int, delta: Tensor) -> Tensor:
        absd = self._buf("abs", stop - start, torch.float32, delta.device)
        if delta.dtype == torch.float32:
            torch.abs(delta, out=absd)
        else:
            absd.copy_(delta.abs())
        out = self._top(self.hi, start, stop, absd, "hi")
        if self.lo is not None:
            out.sub_(self._top(self.lo, start, stop, absd, "lo"))
        return out

    def _shrink(self, top: _Top, start: int, stop: int, delta: Tensor, out: Tensor) -> Tensor:
        """``out`` = delta where kept by ``top`` else 0 (``out`` may be ``delta``): one fused
        hardshrink, plus putting back the kept elements equal to the threshold."""
        lam = top.lam_for(delta.dtype)
        if lam < 0:  # everything is kept
            return out if out is delta else out.copy_(delta)
        idx = None
        if top.need is not None:
            if start == 0:  # a new ascending pass (e.g. the rescale pass, then the merge)
                top.seen, top.next_start = 0, 0
            if top.ties is None and start != top.next_start:  # not one ascending pass: locate ties
                top.tie_positions()
            top.next_start = stop
            if top.ties is not None:
                if start < top.cut:
                    ties = top.ties
                    bounds = torch.tensor([start, stop], dtype=ties.dtype, device=ties.device)
                    a, b = (int(i) for i in torch.searchsorted(ties, bounds))
                    idx = ties[a:b] - start
            elif top.seen < top.need:  # keep the first ties of this pass, in index order
                tied = self._tied(delta, top.thr)
                count = int(torch.count_nonzero(tied))
                if top.seen + count <= top.need:  # every tie in this chunk is kept: |d| >= thr
                    top.seen += count
                    return torch.hardshrink(delta, top.below(delta.dtype), out=out)
                idx = torch.nonzero(tied).view(-1)[: top.need - top.seen]
                top.seen += idx.numel()
        if idx is None or idx.numel() == 0:
            return torch.hardshrink(delta, lam, out=out)
        values = delta.index_select(0, idx)
        return torch.hardshrink(delta, lam, out=out).index_copy_(0, idx, values)

    def _tied(self, delta: Tensor, thr: float) -> Tensor:
        """Where ``|delta| == thr`` in a float32/float16/bfloat16 chunk, compared as bit patterns
        without the sign (faster than a float comparison), in scratch buffers (see `share_scratch`)."""
        n = delta.numel()
        bits = _bit_dtype(delta.dtype)
        sign_off = (1 << (8 * delta.element_size() - 1)) - 1
        keys = torch.bitwise_and(delta.view(bits), sign_off, out=self._buf("tie_key", n, bits, delta.device))
        return torch.eq(keys, _bit_pattern(thr, delta.dtype), out=self._buf("tie_eq", n, torch.bool, delta.device))

    def shrink(self, dtype: torch.dtype) -> Shrink | None:
        """`_shrink` over a whole tensor, in one ascending pass: hardshrink by ``lam_for`` in
        ``dtype``, then the first ``need`` elements equal to the threshold put back."""
        if self.lo is not None or dtype not in _KEY_FORMATS:
            return None
        top = self.hi
        lam = float(torch.tensor(top.lam_for(dtype), dtype=dtype))
        if lam < 0 or top.need is None:
            return Shrink(lam, 0, 0)
        return Shrink(lam, _bit_pattern(top.thr, dtype), top.need)

    def apply_(self, start: int, stop: int, delta: Tensor) -> Tensor:
        # The thresholds are float32 magnitudes: exact for fp32/fp16/bf16 chunks only.
        if delta.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return super().apply_(start, stop, delta)
        if self.lo is None:
            return self._shrink(self.hi, start, stop, delta, delta)
        top = self._shrink(self.lo, start, stop, delta, self._buf("top", stop - start, delta.dtype, delta.device))
        return self._shrink(self.hi, start, stop, delta, delta).sub_(top)

def _bit_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype.itemsize == 2 else torch.int32


def _bit_pattern(value: float, dtype: torch.dtype) -> int:
    """``value`` (a magnitude: non-negative) rounded to ``dtype``, as the integer of its bits."""
    return int(torch.tensor([value], dtype=dtype).view(_bit_dtype(dtype))[0])


class NoiseMask(Mask):
    """DARE: keep when ``u < p`` (written as clamp(sign(p - u), 0, 1))."""

    def __init__(self, noise: Tensor, p: float):
        super().__init__()
        self.noise, self.p = noise, p

    def keep(self, start: int, stop: int, delta: Tensor) -> Tensor:
        out = self._buf("m", stop - start, torch.float32, delta.device)
        torch.sub(self.noise[start:stop], self.p, out=out).neg_().sign_().clamp_(0, 1)
        return out


class DellaMask(Mask):
    """DELLA (MagPrune): keep when ``u < (density - eps) + 2 eps * row_rank / (cols - 1)``."""

    def __init__(self, ranks: Tensor, noise: Tensor, cols: int, density: float, epsilon: float):
        super().__init__()
        self.ranks, self.noise = ranks, noise
        self.low = density - epsilon
        # A row of one element has no order: it gets the mean probability, `density`.
        self.step = 2 * epsilon / (cols - 1) if cols > 1 else 0.0
        if cols <= 1:
            self.low = density

    def keep(self, start: int, stop: int, delta: Tensor) -> Tensor:
        out = self._buf("m", stop - start, torch.float32, delta.device)
        torch.mul(self.ranks[start:stop], self.step, out=out)
        out.add_(self.low).sub_(self.noise[start:stop]).sign_().clamp_(0, 1)
        return out


def della_check(density: float, epsilon: float) -> None:
    if problem := della_problem(density, epsilon):
        raise ValueError(problem)


def _rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (numel // rows if rows else 0)


# ---- sparsifiers ---------------------------------------------------------------------------


@runtime_checkable
class Sparsifier(Protocol):
    """Builds keep-masks. ``key`` identifies a delta (source tensor and base) for caching;
    ``delta`` computes it when needed (full tensor, any shape; see `fresh`)."""

    def magnitude(self, key: Hashable, delta: DeltaFn, numel: int, lo: int, hi: int) -> Mask:
        """Keep magnitude ranks in ``[lo, hi)`` (``lo=0, hi=k``: the k largest |delta|)."""
        ...

    def random(self, noise_id: NoiseId, numel: int, p: float, device: torch.device | None = None) -> Mask:
        """Keep each element independently with probability ``p`` (DARE); the mask lives on
        ``device`` (default the CPU), its noise drawn as on the CPU."""
        ...

    def della(
        self, key: Hashable, delta: DeltaFn, shape: tuple[int, ...], noise_id: NoiseId,
        density: float, epsilon: float,
    ) -> Mask:
        """DELLA's magnitude-graded keep probabilities per row, sampled with the noise."""
        ...


class _NoiseAndRanks:
    """`random` and `della` masks from two steps the sparsifiers do differently: a tensor's noise
    and its per-row magnitude ranks."""

    def noise(self, noise_id: NoiseId, numel: int, device: torch.device | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _della_ranks(self, key: Hashable, delta: DeltaFn) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def random(self, noise_id: NoiseId, numel: int, p: float, device: torch.device | None = None) -> Mask:
        if (trivial := _trivial(p)) is not None:
            return trivial
        return NoiseMask(self.noise(noise_id, numel, device), p)

    def della(
        self, key: Hashable, delta: DeltaFn, shape: tuple[int, ...], noise_id: NoiseId,
        density: float, epsilon: float,
    ) -> Mask:
        if (trivial := _trivial(density)) is not None:
            return trivial
        della_check(density, epsilon)
        _, cols = _rows_cols(tuple(shape))
        ranks = self._della_ranks(key, delta)
        device = getattr(delta, "device", None)  # where the kernel runs (a shared table may be on the CPU)
        if device is not None and ranks.device != device:
            ranks = ranks.to(device)
        return DellaMask(ranks, self.noise(noise_id, ranks.numel(), ranks.device), cols, density, epsilon)


def one_shot_magnitude(delta: DeltaFn, numel: int, lo: int, hi: int) -> Mask:
    """Keep magnitude ranks ``[lo, hi)`` by an O(N) selection over ``delta()``, keeping nothing.
    16-bit deltas: a histogram of their 2^15 magnitudes gives the exact thresholds; others: a
    sample brackets each threshold and ``kthvalue`` resolves it inside the bracket."""
    band = _band(numel, lo, hi)
    if isinstance(band, Mask):
        return band
    lo, hi = band
    d = delta()
    if d.dtype in _KEY_FORMATS:
        cum = magnitude_counts(d)
        absd: list[Tensor] = []

        def absd_fn() -> Tensor:
            if not absd:
                absd.append(_abs_f32(d))
            return absd[0]

        top_hi = counts_top(cum, hi, absd_fn, d.dtype) if hi < numel else _Top(-1.0, numel)
        top_lo = counts_top(cum, lo, absd_fn, d.dtype) if lo > 0 else None
        return ThresholdBandMask(top_hi, top_lo)
    absf = _abs_f32(d, fresh(delta))
    top_hi = select_top(absf, hi) if hi < numel else _Top(-1.0, numel)
    top_lo = select_top(absf, lo) if lo > 0 else None
    return ThresholdBandMask(top_hi, top_lo)


# 16-bit float formats whose magnitudes are 15-bit keys: a histogram of 2^15 counts ranks them
_KEY_FORMATS = (torch.bfloat16, torch.float16)
_KEYS = 1 << 15
_COUNT_CHUNK = 1 << 22


def magnitude_counts(delta: Tensor) -> Tensor:
    """For a 16-bit ``delta``: ``cum[v]`` = how many elements have ``|delta|`` with bit pattern
    ``<= v`` (2^15 entries; the magnitudes of a 16-bit float order like their bit patterns).
    One O(N) pass in chunks; int32 counts below 2^31 elements, else int64."""
    flat = delta.reshape(-1).view(torch.int16)
    counts = torch.zeros(_KEYS, dtype=torch.int64, device=flat.device)
    for s in range(0, flat.numel(), _COUNT_CHUNK):
        keys = flat[s:s + _COUNT_CHUNK].to(torch.int32).bitwise_and_(_KEYS - 1)
        counts += torch.bincount(keys, minlength=_KEYS)
    return counts.cumsum_(0).to(_index_dtype(flat.numel()))


# float32 magnitudes ranked by 16-bit keys: the top 16 of the 31 bits of |delta| (exponent and
# 8 mantissa bits; non-negative floats order like their bit patterns), exact inside a key's bin
_F32_SHIFT = 15
_F32_KEYS = 1 << 16


def f32_magnitude_counts(delta: Tensor) -> Tensor:
    """For a float32 ``delta``: ``cum[v]`` = how many elements have ``|delta|`` with a 16-bit key
    (bit pattern >> 15) ``<= v`` (2^16 entries). One O(N) pass in chunks; int32 counts below
    2^31 elements, else int64."""
    flat = delta.reshape(-1).contiguous()
    counts = torch.zeros(_F32_KEYS, dtype=torch.int64, device=flat.device)
    for s in range(0, flat.numel(), _COUNT_CHUNK):
        keys = flat[s:s + _COUNT_CHUNK].view(torch.int32).bitwise_and(0x7FFFFFFF).bitwise_right_shift_(_F32_SHIFT)
        counts += torch.bincount(keys, minlength=_F32_KEYS)
    return counts.cumsum_(0).to(_index_dtype(flat.numel()))


def f32_counts_top(cum: Tensor, k: int, bin_members: Callable[[int], Tensor], absd_fn: Callable[[], Tensor]) -> _Top:
    """Like :func:`lookup_top` from :func:`f32_magnitude_counts`: the table says which key's bin
    holds the k-th largest; when only some of that bin is kept, its members (``bin_members(v)``:
    the |delta| values with key ``v``, found by one O(N) scan) are ranked exactly."""
    n = int(cum[-1])
    target = torch.tensor([n - k], dtype=cum.dtype, device=cum.device)
    v = int(torch.searchsorted(cum, target, right=True))  # first key with more than n - k at or below
    above = n - int(cum[v])  # elements in higher bins: all kept
    in_bin = int(cum[v]) - (int(cum[v - 1]) if v > 0 else 0)
    if above + in_bin == k:  # the whole bin is kept: |d| >= its lower edge, nothing else
        edge = torch.tensor([v << _F32_SHIFT], dtype=torch.int32).view(torch.float32)[0]
        return _Top(float(edge), n)
    members = bin_members(v)
    thr_t = torch.kthvalue(members, members.numel() - (k - above) + 1).values
    n_gt = above + int(torch.count_nonzero(members > thr_t))
    n_ge = above + int(torch.count_nonzero(members >= thr_t))
    return _top_from_counts(absd_fn, thr_t, k, n_gt, n_ge, n, resolve=False)


_SCAN_CHUNK = 1 << 14  # elements per step of a CPU scan (cache-sized buffers, no full-size temporary)


def f32_bin_members(delta: DeltaFn, numel: int, v: int) -> Tensor:
    """The |delta| values (float32) whose 16-bit key (bit pattern >> 15) is ``v``, in index order.

    One scan. On the CPU it goes in cache-sized chunks, by numpy (a third of torch's per-op cost
    here), and a delta that writes a flat chunk into a buffer (``delta.chunk(start, stop, out)``)
    is never formed whole; on an accelerator it is one step."""
    chunk = getattr(delta, "chunk", None)
    device = torch.device(getattr(delta, "device", "cpu")) if chunk is not None else None
    full = None if chunk is not None else delta().reshape(-1)
    device = full.device if full is not None else device
    if device.type != "cpu":
        d = full if full is not None else chunk(0, numel, torch.empty(numel, dtype=torch.float32, device=device))
        keys = d.view(torch.int32).bitwise_and(0x7FFFFFFF).bitwise_right_shift_(_F32_SHIFT)
        return d[keys == v].abs()
    width = min(_SCAN_CHUNK, numel)
    buf = torch.empty(width, dtype=torch.float32) if chunk is not None else None
    keys, hit = np.empty(width, dtype=np.int32), np.empty(width, dtype=bool)
    found = [np.empty(0, dtype=np.float32)]
    for start in range(0, numel, _SCAN_CHUNK):
        stop = min(numel, start + _SCAN_CHUNK)
        n = stop - start
        d = (chunk(start, stop, buf[:n]) if buf is not None else full[start:stop]).numpy()
        np.right_shift(np.bitwise_and(d.view(np.int32), 0x7FFFFFFF, out=keys[:n]), _F32_SHIFT, out=keys[:n])
        found.append(np.abs(d[np.equal(keys[:n], v, out=hit[:n])]))
    return torch.from_numpy(np.concatenate(found))


def counts_top(cum: Tensor, k: int, absd_fn: Callable[[], Tensor], dtype: torch.dtype) -> _Top:
    """Like :func:`lookup_top` from :func:`magnitude_counts` of a ``dtype`` delta: exact."""
    n = int(cum[-1])
    target = torch.tensor([n - k], dtype=cum.dtype, device=cum.device)
    v = int(torch.searchsorted(cum, target, right=True))  # first key with more than n - k at or below
    n_gt = n - int(cum[v])
    n_ge = n - (int(cum[v - 1]) if v > 0 else 0)
    thr_t = torch.tensor([v], dtype=torch.int16).view(dtype).float()[0]
    return _top_from_counts(absd_fn, thr_t, k, n_gt, n_ge, n, resolve=False)


def _delta_dtype(delta: DeltaFn) -> torch.dtype:
    """The dtype ``delta()`` returns: declared (``delta.dtype``), else from a call."""
    dtype = getattr(delta, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else delta().dtype


class OneShotSparsifier(_NoiseAndRanks):
    """Computes every mask from scratch and keeps nothing (a single merge to disk)."""

    def magnitude(self, key: Hashable, delta: DeltaFn, numel: int, lo: int, hi: int) -> Mask:
        return one_shot_magnitude(delta, numel, lo, hi)

    def noise(self, noise_id: NoiseId, numel: int, device: torch.device | None = None) -> Tensor:
        return make_noise(noise_id, numel, device)

    def _della_ranks(self, key: Hashable, delta: DeltaFn) -> Tensor:
        return row_ranks(delta(), owned=fresh(delta))


class CachedSparsifier(_NoiseAndRanks):
    """Precomputes magnitude tables, row ranks and noise once per key, within a memory budget;
    a candidate's mask is then a threshold lookup and O(N) elementwise work, sort-free.

    Magnitude tables: for 16-bit deltas, the cumulative histogram of their 2^15 magnitudes
    (`magnitude_counts`: 128 KiB per tensor, whatever its size, and exact); for float32 deltas,
    that of the 2^16 keys of their magnitudes (`f32_magnitude_counts`, 256 KiB per tensor),
    exact through a scan of the threshold's bin per candidate (`f32_counts_top`); for tensors
    smaller than those tables and other dtypes, the magnitudes sorted (4 bytes per element). ``budget_bytes`` (None: no limit) bounds what the
    tables, row ranks and noise hold together: a table that would not fit is not kept, and
    that tensor's mask comes from a one-shot selection (`one_shot_magnitude`), with the same
    result. ``fallbacks`` counts those.

    ``rank_computations`` (magnitude tables) / ``row_rank_computations`` / ``noise_generations``
    count the expensive steps (tests check that a second candidate triggers none). ``nbytes()``
    says how much memory the cache holds; ``clear()`` drops it. Thread-safe: the expensive
    steps run outside the lock, so threads merging different tensors do not wait on each other.
    """

    def __init__(self, noise_seeds: int = 2, budget_bytes: int | None = None):
        self.noise_seeds = max(1, noise_seeds)
        self.budget_bytes = budget_bytes
        self._ranks: dict[Hashable, Tensor] = {}  # magnitude tables per source key
        self._row_ranks: dict[Hashable, Tensor] = {}
        self._noise: OrderedDict[int, dict[NoiseId, Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._reserved = 0  # bytes promised to tables kept (or being made)
        self.rank_computations = 0
        self.row_rank_computations = 0
        self.noise_generations = 0
        self.fallbacks = 0

    def _reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget (then they are counted as held); call locked."""
        if self.budget_bytes is not None and self._reserved + nbytes > self.budget_bytes:
            self.fallbacks += 1
            return False
        self._reserved += nbytes
        return True

    def _budgeted(self, store: dict, key: Hashable, nbytes: int, make: Callable[[], Tensor], counter: str) -> Tensor | None:
        """The cached table of ``key``, made now when it fits the budget; None when it does not."""
        with self._lock:
            if store.get(key) is None and not self._reserve(nbytes):
                return None
        return self._cached(store, key, make, counter)

    def _cached(self, store: dict, key: Hashable, make: Callable[[], Tensor], counter: str) -> Tensor:
        with self._lock:
            hit = store.get(key)
        if hit is not None:
            return hit
        value = make()
        with self._lock:
            hit = store.get(key)
            if hit is not None:  # another thread made it meanwhile
                return hit
            store[key] = value
            setattr(self, counter, getattr(self, counter) + 1)
        return value

    def noise(self, noise_id: NoiseId, numel: int, device: torch.device | None = None) -> Tensor:
        seed = noise_id[0]
        with self._lock:
            by_id = self._noise.get(seed)
            if by_id is None:
                by_id = self._noise[seed] = {}
                while len(self._noise) > self.noise_seeds:
                    _, dropped = self._noise.popitem(last=False)
                    self._reserved -= sum(_nbytes(t) for t in dropped.values())
            else:
                self._noise.move_to_end(seed)
            hit = by_id.get(noise_id)
            if hit is not None and hit.numel() == numel and _on(hit, device):
                return hit
            keep = self._reserve(4 * numel)
        made = make_noise(noise_id, numel, device)
        if keep:
            with self._lock:
                old = by_id.get(noise_id)
                by_id[noise_id] = made
                self._reserved -= _nbytes(old) if old is not None else 0
                self.noise_generations += 1
        return made

    def magnitude(self, key: Hashable, delta: DeltaFn, numel: int, lo: int, hi: int) -> Mask:
        band = _band(numel, lo, hi)
        if isinstance(band, Mask):
            return band
        lo, hi = band
        dtype = _delta_dtype(delta)
        key = (key, str(dtype))  # a delta formed in another dtype ranks differently
        kind = _table_kind(dtype, numel)
        absd: list[Tensor] = []

        def absd_fn() -> Tensor:  # computed at most once per mask
            if not absd:
                absd.append(_abs_f32(delta(), fresh(delta)))
            return absd[0]

        # per kind: how the table is built, and how a threshold is read from it
        build, read = {
            "counts": (lambda: magnitude_counts(delta()), lambda t, k: counts_top(t, k, absd_fn, dtype)),
            "f32_counts": (lambda: f32_magnitude_counts(delta()),
                           lambda t, k: f32_counts_top(t, k, lambda v: f32_bin_members(delta, numel, v), absd_fn)),
            "sorted": (lambda: sorted_magnitudes(delta(), owned=fresh(delta)), lambda t, k: lookup_top(t, k, absd_fn)),
        }[kind]
        table = self._budgeted(self._ranks, key, _table_bytes(kind, numel), build, "rank_computations")
        if table is None:
            return one_shot_magnitude(delta, numel, lo, hi)
        top_hi = read(table, hi) if hi < numel else _Top(-1.0, numel)
        top_lo = read(table, lo) if lo > 0 else None
        if all(t is None or t.need is None for t in (top_hi, top_lo)):
            absd.clear()  # no tie left to place: the mask does not hold |delta| while it is applied
        return ThresholdBandMask(top_hi, top_lo)

    def _della_ranks(self, key: Hashable, delta: DeltaFn) -> Tensor:
        numel = getattr(delta, "numel", None)
        numel = numel if isinstance(numel, int) else delta().numel()
        key = (key, str(_delta_dtype(delta)))
        ranks = self._budgeted(self._row_ranks, key, numel * _index_dtype(numel).itemsize,
                               lambda: row_ranks(delta(), owned=fresh(delta)), "row_rank_computations")
        return ranks if ranks is not None else row_ranks(delta(), owned=fresh(delta))

    def nbytes(self) -> int:
        with self._lock:
            total = sum(_nbytes(t) for t in self._ranks.values())
            total += sum(_nbytes(t) for t in self._row_ranks.values())
            total += sum(_nbytes(t) for d in self._noise.values() for t in d.values())
        return total

    def clear(self) -> None:
        with self._lock:
            self._ranks.clear()
            self._row_ranks.clear()
            self._noise.clear()
            self._reserved = 0


def _table_kind(dtype: torch.dtype, numel: int) -> str:
    """The magnitude table a cache keeps for a ``dtype`` delta of ``numel`` elements: a histogram
    ("counts": 16-bit; "f32_counts": float32, 16-bit keys) where it is smaller than the sorted
    magnitudes ("sorted", 4 bytes per element)."""
    kind = "counts" if dtype in _KEY_FORMATS else "f32_counts" if dtype == torch.float32 else "sorted"
    return kind if kind != "sorted" and _table_bytes(kind, numel) < 4 * numel else "sorted"


def _table_bytes(kind: str, numel: int) -> int:
    keys = {"counts": _KEYS, "f32_counts": _F32_KEYS}.get(kind)
    return 4 * numel if keys is None else keys * _index_dtype(numel).itemsize


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _on(t: Tensor, device: torch.device | None) -> bool:
    want = torch.device("cpu") if device is None else torch.device(device)
    return t.device.type == want.type and (want.index is None or t.device.index == want.index)
