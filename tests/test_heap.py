"""The heap trim after each large compile (jaxtl.train.heap): jax still records the compile
event the listener waits for, and the listener trims once per large compile, never for small
ones, however often it is installed."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.train import heap


def test_jax_records_the_backend_compile_event_before_the_program_runs():
    seen = []

    def listener(event, duration, **_):
        seen.append((event, duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # A shape no other test compiles, so this is a fresh compile (or a persistent-cache
        # load, which jax records under the same event).
        n = 977
        out = jax.jit(lambda x: jnp.sin(x) @ x.T)(np.ones((n, 3), np.float32))
        out.block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert heap._COMPILE_EVENT in [event for event, _ in seen]


def test_one_trim_per_large_compile_however_often_installed():
    if not heap.install():
        assert not sys.platform.startswith("linux"), "glibc has malloc_trim"
        pytest.skip("this C library has no malloc_trim (not glibc): install() is a no-op")
    assert heap.install() and heap.install()  # idempotent
    before = heap.trims()
    jax.monitoring.record_event_duration_secs(heap._COMPILE_EVENT, heap.MIN_COMPILE_SECONDS)
    assert heap.trims() == before + 1  # one listener, however many installs
    jax.monitoring.record_event_duration_secs(heap._COMPILE_EVENT, 0.01)
    jax.monitoring.record_event_duration_secs("/jax/some/other/event", 5.0)
    assert heap.trims() == before + 1  # small compiles and other events do not trim
