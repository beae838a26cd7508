"""Workers give back what an evaluation leaves behind before they merge the next candidate."""

from __future__ import annotations

import sys

import pytest
import torch

from evomerge.run.worker_memory import (
    MemoryMeter,
    private_memory,
    release_blas_buffers,
    release_free_memory,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _gemms() -> None:
    a = torch.randn(512, 512)
    for _ in range(3):
        a = torch.nn.functional.linear(a, a) / 512


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL keeps the buffers")
def test_release_blas_buffers_gives_back_mkl_scratch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker; MKL keeps one set of buffers per thread
    try:
        _gemms()
        release_free_memory()
        kept = private_memory()[0]
        release_blas_buffers()
        release_free_memory()
        freed = kept - private_memory()[0]
        assert freed > 256 * 1024, freed  # MKL packs panels of both operands: ~MBs at this size
        _gemms()  # and GEMMs still run (MKL allocates them again)
        release_blas_buffers()
        release_blas_buffers()  # nothing left to free: harmless
    finally:
        torch.set_num_threads(before)


def test_meter_splits_a_job_where_the_evaluator_is_called():
    meter = MemoryMeter()
    meter.set_base()
    meter.job_starts()
    held = torch.ones(4 * 2**20 // 4)  # 4 MiB "skeleton", kept through the evaluation
    meter.evaluation_starts()
    scratch = torch.ones(8 * 2**20 // 4)  # 8 MiB of activations
    del scratch
    meter.evaluation_ends()
    meter.job_ends()
    figures = meter.figures()
    assert figures["jobs_metered"] == 1
    assert 3.5 * 2**20 <= figures["resident"] <= 6 * 2**20
    assert figures["merge_peak"] >= figures["resident"]
    assert figures["eval_working_set"] >= 7.5 * 2**20
    assert figures["evaluate_peak"] >= figures["resident"] + 7.5 * 2**20
    del held
