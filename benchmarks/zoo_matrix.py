"""The zoo against its budgets: every model of ``benchmarks/zoo.py`` in the loops users write, on one GPU.

For each (model, loop) ``compile`` (plain ``torch.compile``) runs first and measures what a step
holds before it starts ("static": parameters, optimizer state, the batch) and its extra peak over
that; then the anchors (``full_ac``: ``torch.utils.checkpoint`` around every repeated block, then
plain ``torch.compile``; ``amb0.5``: ``activation_memory_budget=0.5``; on request ``offload_mm``:
plain ``torch.compile`` with PyTorch's activation offloading of every saved matmul output,
``benchmarks/offload_anchor.py``) and ``sac F`` for each
fraction F: ``backend="sac"`` with the absolute ``memory_budget`` = static + F x compile's extra
peak, enforced at run time (the default). Every cell is its own process (``--cell``), so memory
left by one cannot skew another; ``--jobs`` runs that many at once: the peaks are per process and
exact. The compiles run side by side; everything after a cell's first step (the warm-up, where the
enforced budget may plan again, and the timed steps) holds a lock that one cell at a time takes, so
step times are taken with the GPU to one process (``--no-lock``: side by side, not comparable).

A cell builds the model at ``--size`` on the GPU (bf16 parameters for the LMs' ``--dtype``),
AdamW, takes ``--warmup`` steps (the first compiles; the enforced budget may plan again in the
next ones), then ``--steps`` timed steps with CUDA events after ``reset_peak_memory_stats``. It
records the step's median time, its peak, the plan's predicted peak per graph, the first plan's
measured peak and how many times it was planned again. A budget is violated when a measured peak
is over it.

Writes ``OUT/cells.jsonl`` (one line per cell, as each finishes) and prints a table;
``--at-anchor-peaks`` runs the anchors first and then ``sac@ANCHOR`` with each anchor's measured
peak as its budget (``--at-peaks-of OUT`` takes the peaks of an earlier run instead).
``--from-json OUT`` prints the table (and, with matplotlib, writes one Pareto plot per model to
``OUT/pareto-MODEL.png``) of an earlier run. Run from the repository root::

    python benchmarks/zoo_matrix.py --out bench-out/zoo --models gpt2 llama --loops loss_outside_criterion
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = ("full_ac", "amb0.5")
# the anchors a cell can run: the default ones and the hand-picked offload set (--anchors offload_mm)
KNOWN_ANCHORS = (*ANCHORS, "offload_mm")


def cell_stem(cell: dict[str, Any]) -> str:
    """A cell's name in file names (its logs, partitions, timelines): model-loop-strategy, with
    spaces dropped and any character but letters, digits, ``.``, ``_`` and ``-`` made ``_`` (an
    ``@`` or a space does not travel everywhere a file is copied)."""
    name = "-".join(str(cell[k]) for k in ("model", "loop", "strategy")).replace(" ", "")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def at_peak_cells(anchors: list[dict[str, Any]], base: dict[str, Any], dump: Path | None = None) -> list[dict[str, Any]]:
    """For each anchor result that measured a peak (no error): ``sac@ANCHOR`` with that peak as its
    absolute budget, the same model, loop, size and dtype (``base``: the other cell fields)."""
    cells = []
    for r in anchors:
        if "error" in r or "peak_bytes" not in r:
            continue
        cells.append(dict(base, model=r["model"], loop=r["loop"], strategy=f"sac@{r['strategy']}",
                          budget_bytes=int(r["peak_bytes"]), **({"dump": str(dump)} if dump is not None else {})))
    return cells


_LEAST_BUDGET = re.compile(r"raise memory_budget to at least (\d+) bytes")


def least_budget_cells(results: list[dict[str, Any]], base: dict[str, Any],
                       dump: Path | None = None) -> list[dict[str, Any]]:
    """For each sac result refused with a least budget named (``BudgetError``: "raise
    memory_budget to at least N bytes"): ``sac@least`` at that budget, the same model and loop. The
    planner's promise is that the least budget it names compiles and holds."""
    cells, named = [], set()
    for r in results:
        found = _LEAST_BUDGET.search(r.get("error", "")) if str(r.get("strategy", "")).startswith("sac") else None
        if found and (r["model"], r["loop"], found.group(1)) not in named:  # several fractions may name one
            named.add((r["model"], r["loop"], found.group(1)))
            cells.append(dict(base, model=r["model"], loop=r["loop"], strategy="sac@least",
                              budget_bytes=int(found.group(1)), **({"dump": str(dump)} if dump is not None else {})))
    return cells


def _with_timelines(cells: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Give each cell a timeline (``--timeline``): OUT/timelines/CELL.png, and CELL.json beside it."""
    for c in cells:
        c["timeline"] = str(out / "timelines" / f"{cell_stem(c)}.png")
    if cells:
        (out / "timelines").mkdir(parents=True, exist_ok=True)
    return cells


def _cell_command(cell: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(cell)]


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One (model, loop, strategy) in this process: what it measured, or the error it raised."""
    import functools

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.zoo import ZOO, TrainStep

    entry = ZOO[cell["model"]]
    device = torch.device("cuda")
    dtype = getattr(torch, cell["dtype"]) if cell.get("dtype") else None
    model = entry.model(cell["size"], device=device, dtype=dtype)
    batch = entry.batch(cell["size"], device=device, dtype=dtype)
    out: dict[str, Any] = dict(cell, device=torch.cuda.get_device_name(), torch=torch.__version__)
    strategy = cell["strategy"]
    records: list[Any] = []
    partitioners: list[Any] = []

    if strategy == "full_ac":
        entry.checkpoint_blocks(model)
    if strategy.startswith("sac"):
        from sac_compiler.backend import SACPartitioner, compile_graph
        from sac_compiler.config import SACConfig
        from sac_compiler.partition_record import record_partition

        # "sac none": no budget (a report makes the backend simulate the partition it compiles)
        options = {"report": os.devnull} if strategy == "sac none" else {"memory_budget": cell["budget_bytes"]}
        if cell.get("enforce") is False:  # the first plan as it measures, not planned again at run time
            options["enforce_budget"] = False
        if strategy.startswith("sac+offload"):  # keep, recompute or offload (SACConfig.offload)
            options["offload"] = True
        options.update(cell.get("sac_options") or {})  # --sac-option KEY=VALUE
        config = SACConfig.from_options(options)
        dump = Path(cell["dump"]) if cell.get("dump") else None

        class Recording(SACPartitioner):
            """Writes each partition it makes as data (``benchmarks/replay_partition.py`` replays it)
            and, for a graph not enforced (no wrapper keeps it), keeps its partitioner for its plan."""

            def __call__(self, gm: Any, joint_inputs: Any, **kwargs: Any) -> Any:
                out = super().__call__(gm, joint_inputs, **kwargs)
                if self not in partitioners:
                    partitioners.append(self)
                if dump is not None and self.last_result is not None:
                    dump.mkdir(parents=True, exist_ok=True)
                    stem = cell_stem(cell)
                    count = len(list(dump.glob(f"{stem}-graph*.json")))
                    try:
                        data = record_partition(self.last_result, *out)
                    except ValueError as error:  # a graph the record cannot hold: the cell goes on
                        print(f"{stem}-graph{count}: not recorded: {error}", file=sys.stderr, flush=True)
                    else:
                        (dump / f"{stem}-graph{count}.json").write_text(json.dumps(data) + "\n")
                return out

        def backend(gm: Any, example_inputs: Any) -> Any:
            # (a recording partitioner skips the AOTAutograd cache, whose hits skip the partitioner)
            recording = dump is not None or not config.enforce_budget
            compiled = compile_graph(gm, example_inputs, config,
                                     partitioner_cls=Recording if recording else SACPartitioner)
            # an enforced graph is a wrapper that keeps its partitioner (the last, after a replan);
            # a graph not enforced is Inductor's callable: its partitioner stands for it
            records.append(partitioners[-1] if not hasattr(compiled, "partitioner") and partitioners else compiled)
            return compiled

        compile_fn = functools.partial(torch.compile, backend=backend)
    else:
        compile_fn = torch.compile
    import torch._functorch.config as functorch_config

    patch: Any = None
    if strategy == "amb0.5":
        patch = functorch_config.patch(activation_memory_budget=0.5)
    elif strategy == "offload_mm":
        from benchmarks.offload_anchor import matmul_offload

        patch = matmul_offload()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    try:
        if patch is not None:
            patch.__enter__()
        step = TrainStep(entry, model, cell["loop"], compile_fn)
        start = time.perf_counter()
        step(batch, optimizer)
        torch.cuda.synchronize()
        out["first_step_s"] = time.perf_counter() - start
        if cell.get("lock"):
            lock = open(cell["lock"], "a")  # noqa: SIM115 - released when the process ends
            waited = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            out["lock_wait_s"] = time.perf_counter() - waited
        for _ in range(cell["warmup"] - 1):
            step(batch, optimizer)
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        out["static_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(cell["steps"]):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(batch, optimizer)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["extra_bytes"] = out["peak_bytes"] - out["static_bytes"]
        out["step_ms"] = statistics.median(times)
        # one more step, split: what forward leaves (saved values, outputs, the loss's own) and the
        # peak of backward and the optimizer
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        output, loss = step.forward_loss(batch)
        torch.cuda.synchronize()
        out["after_forward_bytes"] = torch.cuda.memory_allocated() - out["static_bytes"]
        out["forward_peak_bytes"] = torch.cuda.max_memory_allocated() - out["static_bytes"]
        del output
        loss.backward()
        torch.cuda.synchronize()
        out["backward_peak_bytes"] = torch.cuda.max_memory_allocated() - out["static_bytes"]
        optimizer.step()
        if cell.get("timeline"):
            out["timeline"] = _record_timeline(step, batch, records, cell)
    except Exception as error:  # noqa: BLE001 - recorded with the cell; the matrix goes on
        out["error"] = f"{type(error).__name__}: {str(error)[-600:]}"
    finally:
        if patch is not None:
            patch.__exit__(None, None, None)
    graphs = []
    for compiled in records:
        result = _result_of(compiled)
        graphs.append({
            "predicted_peak": getattr(getattr(result, "partitioned", None), "peak_bytes", None),
            # the step's peak the plan predicts, as the enforcement compares it with the measured
            # one: with the graph's other runs in the step and the caller's loss it counts
            "step_predicted": getattr(result, "step_peak_bytes", None),
            # the caller's loss between forward and backward, as the measured step showed it
            "caller_loss_bytes": getattr(result, "measured_loss_memory", None),
            "first_measured": (getattr(compiled, "measured", None) or [None])[0],
            "first_predicted": (getattr(compiled, "predicted", None) or [None])[0],
            "replans": getattr(compiled, "replans", None),
            "caller_held_bytes": getattr(result, "caller_held_bytes", None),
            # the mark between the measured step's backward and the next forward, where over the budget
            "measured_outside_peak": getattr(result, "measured_outside_peak", None),
            # what the plan counted of the memory a step starts from (parameters, buffers, inputs,
            # optimizer state, what the process held): against the cell's measured static_bytes
            "counted_static_bytes": (result.analysis.memory.static_bytes + result.analysis.memory.optimizer_state_bytes
                                     + result.outside_bytes if getattr(result, "analysis", None) is not None else None),
            "recomputed": len(result.plan.recompute) if getattr(result, "plan", None) is not None else None,
            "planning_s": getattr(result, "planning_s", None),
            "predicted_saved_bytes": getattr(getattr(result, "partitioned", None), "saved_bytes", None),
            "offloaded_bytes": getattr(getattr(result, "offload", None), "bytes", None),
            "offload_stall_ms": getattr(getattr(result, "offload", None), "stall_ms", None),
            # the link's bytes/s the plan counted its copies with (measured once per GPU)
            "offload_bandwidth": getattr(getattr(result, "offload", None), "bandwidth", None),
            "offload_note": getattr(result, "offload_note", None),
        })
    out["graphs"] = graphs
    if "budget_bytes" in cell and "peak_bytes" in out:
        out["violation"] = out["peak_bytes"] > cell["budget_bytes"]
    return out


def _result_of(compiled: Any) -> Any:
    """The plan of one graph the sac backend compiled (``None`` before it partitioned)."""
    return (getattr(compiled, "result", None) or getattr(getattr(compiled, "partitioner", None), "last_result", None)
            or getattr(compiled, "last_result", None))


def _record_timeline(step: Any, batch: Any, records: list[Any], cell: dict[str, Any]) -> dict[str, Any]:
    """One more step (forward, loss, backward) with the CUDA allocator recording every allocation
    and free; writes its live bytes beside the simulation of each graph the sac backend planned to
    ``cell["timeline"]`` (a PNG) and returns the trace's peak, the allocator's own high-water mark
    over the same step, and the event count (the two peaks agree when the trace lost nothing)."""
    import torch

    from sac_compiler import plots

    device = torch.cuda.current_device()
    step.model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=4_000_000)
    try:
        output, loss = step.forward_loss(batch)
        torch.cuda.synchronize()
        forward_events = len(plots.allocator_events(torch.cuda.memory._snapshot(), device))
        del output
        loss.backward()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    high_water = torch.cuda.max_memory_allocated()
    events = plots.allocator_events(snapshot, device)
    budget = cell.get("budget_bytes")
    panels = []
    for i, compiled in enumerate(records):
        result = _result_of(compiled)
        if result is not None and getattr(result, "partitioned", None) is not None:
            panels.append(plots.timeline_panel(result.partitioned, f"simulated, graph {i}", budget))
    measured = plots.measured_timeline_panel(events, base, "measured (CUDA allocator)", forward_events, budget)
    panels.append(measured)
    try:
        plots.timeline_plot(panels, cell["timeline"],
                            title=" ".join(str(cell[k]) for k in ("model", "loop", "strategy")))
    except plots.MissingMatplotlib as error:
        print(f"no timeline plot: {error}", file=sys.stderr)
    peak, peak_event, blocks = plots.allocator_live_at_peak(snapshot, device, where=_allocation_site)
    sites: dict[str, list[int]] = {}
    for size, site in blocks:
        sites.setdefault(site, []).append(size)
    simulated = []
    for i, compiled in enumerate(records):
        partitioned = getattr(_result_of(compiled), "partitioned", None)
        if partitioned is not None and partitioned.lifetimes:
            simulated.append({"graph": i, "peak_graph": partitioned.peak_graph, "peak_node": partitioned.peak_node,
                              "peak_bytes": partitioned.peak_bytes, "live": partitioned.live_at_peak(),
                              # every step and every record, to compare at any moment, not only the peaks
                              "steps": [list(names) for names in partitioned.steps],
                              "lifetimes": [[[life.name, life.category.value, life.rule, life.alloc_step,
                                              life.free_step, life.freed.name, life.nbytes] for life in lifetimes]
                                            for lifetimes in partitioned.lifetimes]})
    # what each side holds at its peak, to compare allocation by allocation
    Path(cell["timeline"]).with_suffix(".json").write_text(json.dumps({
        "measured": {"peak_over_base": peak, "base": base, "event": peak_event, "forward_events": forward_events,
                     "sites": sorted(([sum(v), len(v), k] for k, v in sites.items()), reverse=True),
                     "events": plots.allocator_trace(snapshot, device, where=_allocation_site)},
        "simulated": simulated}, indent=1) + "\n")
    return {"trace_peak_bytes": max(measured.totals, default=base), "max_memory_allocated": high_water,
            "events": len(events), "forward_events": forward_events,
            "simulated_peaks": [max(p.totals, default=0) for p in panels[:-1]]}


def _allocation_site(frames: list[dict[str, Any]]) -> str:
    """Where a block was allocated: the innermost frame outside torch's own files (Inductor's
    generated code, the zoo's model or loop), with its source line."""
    import linecache

    import torch

    package = str(Path(torch.__file__).parent)
    frame = next((f for f in frames if not f["filename"].startswith(package)), frames[0] if frames else None)
    if frame is None:
        return "?"
    text = linecache.getline(frame["filename"], frame["line"]).strip()
    return f"{Path(frame['filename']).name}:{frame['line']} {text[:160]}"


def _spawn(cell: dict[str, Any], logs: Path | None = None) -> dict[str, Any]:
    """Run one cell in its own process; its stderr (the backend's log at INFO) goes to ``logs``."""
    env = dict(os.environ, SAC_LOG=os.environ.get("SAC_LOG", "info"))
    if cell.get("lock"):
        # compiles side by side must leave a core to the cell whose steps are timed
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "2")
        env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(_cell_command(cell), capture_output=True, text=True, cwd=ROOT, env=env)
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        name = cell_stem(cell)
        (logs / f"{name}.log").write_text(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(cell, error=f"exit {proc.returncode}: {proc.stderr[-600:]}")
    return json.loads(lines[-1])


def run_at_peaks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The anchors, and beside each ``sac`` with the anchor's own measured peak as its absolute
    budget: the same peak, one run, so the step times compare (the anchors' peaks repeat exactly
    from run to run). The peaks are an earlier run's (``--at-peaks-of OUT``: its ``cells.jsonl``;
    the anchors run again beside sac), or, with ``--at-anchor-peaks``, this run's: the anchors run
    first, then sac at the peaks they measured. A sac cell refused there runs again at the least
    budget its error names."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(size=args.size, warmup=args.warmup, steps=args.steps, dtype=args.dtype)
    if args.sac_options:
        base["sac_options"] = args.sac_options
    if args.lock:
        base["lock"] = str(out.resolve() / "gpu.lock")
    dump = out / "partitions" if args.dump_partitions else None
    if args.at_peaks_of:
        earlier = [json.loads(line) for line in (Path(args.at_peaks_of) / "cells.jsonl").read_text().splitlines()
                   if line]
        anchors = [r for r in earlier
                   if r["model"] in args.models and r["loop"] in args.loops and r["strategy"] in args.anchors
                   and r.get("dtype") == args.dtype and r.get("size") == args.size]
        cells = []
        for r in anchors:
            if "error" not in r:
                cells.append(dict(base, model=r["model"], loop=r["loop"], strategy=r["strategy"]))
                cells += at_peak_cells([r], base, dump)
        done = _run_cells(_with_timelines(cells, out) if args.timeline else cells, out, args.jobs)
    else:
        anchors = [dict(base, model=m, loop=loop, strategy=a) for m in args.models for loop in args.loops
                   for a in args.anchors]
        measured = _run_cells(_with_timelines(anchors, out) if args.timeline else anchors, out, args.jobs)
        at_peaks = at_peak_cells(measured, base, dump)
        done = measured + _run_cells(_with_timelines(at_peaks, out) if args.timeline else at_peaks, out, args.jobs)
    # sac refused at an anchor's peak: run it at the least budget the refusal names
    least = least_budget_cells(done, base, dump)
    return done + _run_cells(_with_timelines(least, out) if args.timeline else least, out, args.jobs)


def _sac_options(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    """``--sac-option KEY=VALUE`` as backend options, each checked as ``SACConfig`` checks it."""
    from sac_compiler.config import SACConfig

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            parser.error(f"--sac-option {pair!r}: give KEY=VALUE, e.g. partition_order=inductor")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    try:
        SACConfig.from_options(options)
    except (TypeError, ValueError) as error:
        parser.error(f"--sac-option: {error}")
    return options


def _run_cells(cells: list[dict[str, Any]], out: Path, jobs: int) -> list[dict[str, Any]]:
    record = _Recorder(out, len(cells))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(_spawn, c, out / "logs") for c in cells]):
            record(future.result())
    return record.done


class _Recorder:
    """Appends each cell's result to ``OUT/cells.jsonl`` as it finishes and prints its row with the
    progress: cells done of ``total`` and the minutes the run has taken."""

    def __init__(self, out: Path, total: int) -> None:
        self.log, self.total = out / "cells.jsonl", total
        self.done: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def __call__(self, result: dict[str, Any]) -> None:
        self.done.append(result)
        with self.log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{len(self.done)}/{self.total} {(time.perf_counter() - self.start) / 60:.1f} min] {_row(result)}",
              flush=True)


def run_matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(m, loop) for m in args.models for loop in args.loops]
    # fewer when a plain compile fails
    record = _Recorder(out, len(pairs) * (1 + len(args.anchors) + len(args.fractions) * (2 if args.offload else 1)))

    base = dict(size=args.size, warmup=args.warmup, steps=args.steps, dtype=args.dtype)
    if args.sac_options:
        base["sac_options"] = args.sac_options
    if args.lock:
        base["lock"] = str(out.resolve() / "gpu.lock")
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # plain compile first: it sets every budget of its (model, loop)
        plain = {pool.submit(_spawn, dict(base, model=m, loop=loop, strategy="compile"), out / "logs"): (m, loop) for m, loop in pairs}
        followers = []
        for future in concurrent.futures.as_completed(plain):
            m, loop = plain[future]
            result = future.result()
            record(result)
            if "error" in result:
                continue
            cells = [dict(base, model=m, loop=loop, strategy=a,
                          **({"dump": str(out / "partitions")} if a == "sac none" and args.dump_partitions else {}))
                     for a in args.anchors]
            cells += [dict(base, model=m, loop=loop, strategy=f"sac {f:g}", fraction=f,
                           budget_bytes=int(result["static_bytes"] + f * result["extra_bytes"]),
                           **({"dump": str(out / "partitions")} if args.dump_partitions else {}))
                      for f in args.fractions]
            cells += [dict(base, model=m, loop=loop, strategy=f"sac+offload {f:g}", fraction=f,
                           budget_bytes=int(result["static_bytes"] + f * result["extra_bytes"]))
                      for f in (args.fractions if args.offload else ())]
            if args.timeline:
                _with_timelines(cells, out)
            followers += [pool.submit(_spawn, c, out / "logs") for c in cells]
        for future in concurrent.futures.as_completed(followers):
            record(future.result())
    # sac refused at its budget: run it at the least budget the refusal names, which must hold
    least = least_budget_cells(record.done, base, out / "partitions" if args.dump_partitions else None)
    return record.done + _run_cells(_with_timelines(least, out) if args.timeline else least, out, args.jobs)


def _gib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:<10} {r['loop']:<24} {r['strategy']:<9} ERROR {r['error'][:160]}"
    # the step's predicted peak where recorded (records before it: the partitioned graphs' peak)
    predicted = [g.get("step_predicted") or g["predicted_peak"] for g in r.get("graphs", [])
                 if g.get("step_predicted") or g.get("predicted_peak")]
    loss = [g["caller_loss_bytes"] for g in r.get("graphs", []) if g.get("caller_loss_bytes")]
    first = [g["first_measured"] for g in r.get("graphs", []) if g.get("first_measured")]
    replans = sum(g.get("replans") or 0 for g in r.get("graphs", []))
    budget = r.get("budget_bytes")
    flag = " OVER" if r.get("violation") else ""
    offloaded = sum(g.get("offloaded_bytes") or 0 for g in r.get("graphs", []))
    links = [g["offload_bandwidth"] for g in r.get("graphs", []) if g.get("offload_bandwidth")]
    return (f"{r['model']:<10} {r['loop']:<24} {r['strategy']:<9} {r['step_ms']:8.2f} ms  extra {_gib(r['extra_bytes'])} "
            f"peak {_gib(r['peak_bytes'])} budget {_gib(budget)} predicted {_gib(max(predicted) if predicted else None)} "
            f"first {_gib(max(first) if first else None)} replans {replans}"
            f"{f' caller loss {_gib(max(loss))}' if loss else ''}"
            f"{f' offloaded {_gib(offloaded)}' if offloaded else ''}"
            f"{f' link {max(links) / 1e9:.1f} GB/s' if links else ''}{flag}")


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model in sorted({r["model"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            if r["model"] == model and "error" not in r:
                ax.scatter(r["extra_bytes"] / 2**30, r["step_ms"], label=f"{r['loop']}: {r['strategy']}", s=18)
        ax.set_xlabel("extra peak (GiB)")
        ax.set_ylabel("step (ms)")
        ax.set_title(model)
        ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(out / f"pareto-{model}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.zoo import LOOPS, ZOO  # noqa: F401 - the choices

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", help="run one cell (JSON) in this process and print its result")
    parser.add_argument("--out", default="bench-out/zoo", help="output folder (default: bench-out/zoo)")
    parser.add_argument("--from-json", metavar="OUT", help="print the table and plots of an earlier run")
    parser.add_argument("--models", nargs="+", default=list(ZOO), help="zoo models (default: all)")
    parser.add_argument("--loops", nargs="+", default=["loss_outside_criterion"], choices=LOOPS,
                        help="loops (default: loss_outside_criterion)")
    parser.add_argument("--anchors", nargs="*", default=list(ANCHORS), choices=KNOWN_ANCHORS, metavar="ANCHOR",
                        help=f"anchor strategies, of {KNOWN_ANCHORS} (default: {ANCHORS})")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.9, 0.75, 0.5],
                        help="sac budgets as fractions of compile's extra peak (default: 0.9 0.75 0.5)")
    parser.add_argument("--offload", action="store_true",
                        help="also run 'sac+offload F' at each fraction: keep, recompute or offload (offload=True)")
    parser.add_argument("--size", default="full", choices=("small", "full"), help="zoo size (default: full)")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: the model's fp32)")
    parser.add_argument("--warmup", type=int, default=7, help="untimed steps; the first compiles (default: 7)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: 3)")
    parser.add_argument("--dump-partitions", action="store_true",
                        help="write each sac graph's partition to OUT/partitions (replay with benchmarks/replay_partition.py)")
    parser.add_argument("--timeline", action="store_true",
                        help="record one more step of each sac and anchor cell with the CUDA allocator's history and "
                             "write it beside the simulation to OUT/timelines/CELL.png, and what each side holds at "
                             "its peak to OUT/timelines/CELL.json")
    parser.add_argument("--sac-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend option for every sac cell (a SACConfig field; the value read as JSON, "
                             "else as text), e.g. --sac-option partition_order=inductor; repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="cells at once (default: 1)")
    parser.add_argument("--at-peaks-of", metavar="OUT",
                        help="run the anchors again and sac with each anchor's peak measured in OUT as its budget")
    parser.add_argument("--at-anchor-peaks", action="store_true",
                        help="run the anchors, then sac with each anchor's peak measured in this run as its budget")
    parser.add_argument("--no-lock", dest="lock", action="store_false",
                        help="let cells run their steps side by side (default: one cell's steps at a time)")
    args = parser.parse_args(argv)
    args.sac_options = _sac_options(parser, args.sac_option)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    if args.from_json:
        rows = [json.loads(line) for line in (Path(args.from_json) / "cells.jsonl").read_text().splitlines() if line]
        for r in sorted(rows, key=lambda r: (r["model"], r["loop"], r["strategy"])):
            print(_row(r))
        _plot(rows, Path(args.from_json))
        return
    if args.at_peaks_of and args.at_anchor_peaks:
        parser.error("--at-peaks-of and --at-anchor-peaks: give one (an earlier run's peaks, or this run's)")
    if args.at_peaks_of or args.at_anchor_peaks:
        run_at_peaks(args)
    else:
        run_matrix(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
