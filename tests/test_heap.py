"""The heap trim after each large compile (jaxtl.train.heap): jax still records the compile
event the listener waits for, between compiling a program and running it; the train steps
install the listener; and it trims once per large compile, never for small ones, however often
it is installed."""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import fit, make_tiny_bert, small_vader

from jaxtl.train import heap

GLIBC = platform.libc_ver()[0] == "glibc"


def _trims_on_a_large_compile_event() -> int:
    before = heap.trims()
    jax.monitoring.record_event_duration_secs(heap._COMPILE_EVENT, heap.MIN_COMPILE_SECONDS)
    return heap.trims() - before


def test_jax_records_the_backend_compile_event_between_compiling_and_running():
    seen = []

    def listener(event, duration, **_):
        seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        x = np.ones((977, 3), np.float32)  # a shape no other test compiles
        compiled = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(x).compile()
        # Compiled (or read from the persistent cache, recorded under the same event), not run:
        assert heap._COMPILE_EVENT in seen
        compiled(x).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _uninstall() -> None:
    """Unregister jaxtl's listener if it is registered (other listeners stay)."""
    try:
        jax.monitoring.unregister_event_duration_listener(heap._listener)
    except (AssertionError, ValueError):
        pass


@pytest.mark.skipif(not GLIBC, reason="no malloc_trim outside glibc: install() is a no-op")
def test_the_train_steps_install_the_listener(tmp_path):
    import jaxtl
    from jaxtl.train import steps

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), jaxtl.TrainConfig())
    state = trainer.init_state(total_steps=2)
    for compile_them in (lambda: steps.compile_steps(state, trainer.mesh), steps.pmap_steps):
        _uninstall()
        assert _trims_on_a_large_compile_event() == 0
        compile_them()
        assert _trims_on_a_large_compile_event() == 1


def test_one_trim_per_large_compile_however_often_installed(monkeypatch):
    if not GLIBC:
        assert not heap.install()
        return
    assert heap.install() and heap.install() and heap.install()
    assert _trims_on_a_large_compile_event() == 1  # one listener, however many installs
    before = heap.trims()
    jax.monitoring.record_event_duration_secs(heap._COMPILE_EVENT, 0.01)
    jax.monitoring.record_event_duration_secs("/jax/some/other/event", 5.0)
    assert heap.trims() == before  # small compiles and other events do not trim
    _uninstall()
    monkeypatch.setenv("JAXTL_HEAP_TRIM", "off")
    assert not heap.install()
    assert _trims_on_a_large_compile_event() == 0  # the opt-out registers nothing
    monkeypatch.delenv("JAXTL_HEAP_TRIM")
    assert heap.install()
    assert _trims_on_a_large_compile_event() == 1


def test_the_loop_saves_then_trims_after_each_validation(tmp_path, monkeypatch):
    """What evaluation and checkpoints freed goes back to the OS before training resumes: on
    CPU each checkpoint is written before the next step (its host copy of the state would
    share memory with the steps), then the heap is trimmed, once per validation. Their effect
    on the resident set is measured by benchmarks/time_to_accuracy.py (benchmarks/README.md)."""
    import jaxtl
    from jaxtl.checkpoint import Checkpointer
    from jaxtl.encoding import encode_splits

    model = jaxtl.load(make_tiny_bert(str(tmp_path / "bert")), num_labels=2)
    arrays, _ = encode_splits(model, small_vader(n_train=64, n_val=16, n_test=8))
    events = []
    trim, save, wait = heap.trim, Checkpointer.save, Checkpointer.wait
    monkeypatch.setattr(heap, "trim", lambda: events.append("trim") or trim())
    monkeypatch.setattr(
        Checkpointer, "save", lambda *a, **k: events.append("save") or save(*a, **k)
    )
    monkeypatch.setattr(Checkpointer, "wait", lambda self: events.append("wait") or wait(self))
    config = jaxtl.TrainConfig(batch_size=8, max_steps=8, eval_every=2, progress=False)
    trainer = jaxtl.Trainer(model, jaxtl.make_plan("full", model.structure), config, tmp_path)
    result = fit(trainer, arrays["train"], arrays["validation"])
    assert len(result.history) == 4
    assert events[:12] == ["save", "wait", "trim"] * 4  # then the end of the run's own waits
    if GLIBC:
        before = heap.trims()
        assert trim() and heap.trims() == before + 1
    monkeypatch.setenv("JAXTL_HEAP_TRIM", "off")
    assert not trim()


_ARENAS = r"""
import ctypes, sys, threading
{setup}
libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
ready, go = threading.Barrier(9), threading.Event()

def work():  # each thread allocates while the others hold theirs: an arena per thread if allowed
    block = libc.malloc(4096)
    ready.wait()
    go.wait()
    libc.free(block)

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
ready.wait()
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
go.set()
for t in threads:
    t.join()
print(ctypes.string_at(buf, size.value).decode().count("<heap nr="))
"""


def _arenas(setup: str, **env) -> int:
    import os
    import subprocess
    import sys

    code = _ARENAS.format(setup=setup)
    mine = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**mine, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="arenas are glibc's")
def test_limit_arenas_caps_the_arenas_that_new_threads_get():
    """Counted from glibc's own report (``malloc_info``) in a fresh process with 8 threads
    allocating at once: one arena each without the cap, at most the cap with it; the ``jaxtl``
    command calls it with its default (one per core), and ``JAXTL_HEAP_TRIM=off`` leaves glibc
    alone."""
    free = _arenas("")  # the main thread's and one per thread, up to glibc's 8 per core
    assert free > 2
    cap = "from jaxtl.train import heap; assert heap.limit_arenas(2)"
    assert _arenas(cap) == 2
    off = "from jaxtl.train import heap; assert not heap.limit_arenas(2)"
    assert _arenas(off, JAXTL_HEAP_TRIM="off") == free
    # A cap of the user's own is left as it is.
    assert _arenas(off, MALLOC_ARENA_MAX="3") == 3
    assert _arenas(off, GLIBC_TUNABLES="glibc.malloc.arena_max=4") == 4


def test_the_jaxtl_command_caps_the_arenas_before_parsing(monkeypatch):
    from jaxtl import cli

    calls = []
    monkeypatch.setattr(heap, "limit_arenas", lambda count=None: calls.append(count))
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    assert calls == [None]


def test_limit_arenas_refuses_fewer_than_one():
    with pytest.raises(ValueError, match=r"limit_arenas\(count=0\): give at least 1 arena"):
        heap.limit_arenas(0)
