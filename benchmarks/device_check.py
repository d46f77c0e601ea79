"""One process, one GPU, every figure RESULTS.md asks for, inside a fixed time budget.

    bash benchmarks/device_check.sh                 # on a bare H100/H200: installs .whl/, runs this
    python -m benchmarks.device_check --cpu         # the same plumbing on a CPU, random:tiny, ~3 min

Sections, in order (each one skipped, with a note, when the time left is below its estimate; a
loop inside a section stops early the same way):

1. startup: building each engine's model copy (random weights are built on the device) and the
   pipeline around it.
2. engines: plain diffusers vs our engine with every knob off and with the auto knobs (fp16,
   channels_last + fused QKV on CUDA), on the seed example (1024x1024, left 300, right 100) and
   the 1024x1024 canvas, 30 steps, CFG 4, ours dpmpp_2m_sde_gpu + karras; `benchmarks/engine.py`'s
   code, runs interleaved; plus one FLOP count of ours on the seed example.
3. samplers: all 18 samplers on the 1024x1024 canvas, 20 steps (karras): finite output, model
   calls/s, UNet and non-UNet ms per call (`benchmarks/noise.py`'s UNet timer).
4. throughput: images/min at queue depth 1, 4, 8 through `OutpaintEngine` (sequential: the
   engine has no batching yet; see `BATCHING HOOK`).
5. compile: ours with torch.compile (mode `default` unless `--compile-mode`: max-autotune takes
   far longer) on the seed example; first run (compile) and timed runs. Last, because its first
   run cannot be interrupted: only the guard before it bounds the whole run.

Writes `<out>/<gpu-name>-<date>.json` (after every section, so a run stopped from outside keeps
what it measured) and prints the markdown rows for RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import re
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks import engine as eb
from benchmarks.common import machine_line, table
from benchmarks.noise import split_run
from models.devices import resolve_dtype
from models.engine import OutpaintEngine, OutpaintRequest
from models.names import SAMPLERS

# Seconds each section is expected to need on an H100 with random:sdxl (the guard skips a section
# when less than this is left), and on this repository's 2-core CPU with random:tiny (--cpu).
GPU_ESTIMATES = {"startup": 90, "engines": 90, "compile": 200, "samplers": 60, "throughput": 30}
CPU_ESTIMATES = {"startup": 20, "engines": 60, "compile": 150, "samplers": 40, "throughput": 30}


class Clock:
    """The whole run's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class Report:
    def __init__(self, clock: Clock, path: Path) -> None:
        self.clock = clock
        self.path = path
        self.data: dict[str, Any] = {"sections": {}, "notes": []}

    def save(self) -> None:
        # After every section, so a run stopped from outside (a timeout) keeps what it measured.
        self.data["total_s"] = self.clock.elapsed()
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def note(self, text: str) -> None:
        print(f"NOTE: {text}", flush=True)
        self.data["notes"].append(text)

    @contextlib.contextmanager
    def section(self, name: str, estimate_s: float) -> Iterator[dict[str, Any] | None]:
        left = self.clock.left()
        if left < estimate_s:
            self.note(f"section {name} skipped: {left:.0f} s left of the budget, it needs ~{estimate_s:.0f} s")
            self.data["sections"][name] = {"skipped": True}
            self.save()
            yield None
            return
        print(f"\n## {name} (t = {self.clock.elapsed():.0f} s, {left:.0f} s left)", flush=True)
        record: dict[str, Any] = {"skipped": False}
        self.data["sections"][name] = record
        started = time.perf_counter()
        try:
            yield record
        except Exception as exc:  # one broken section must not cost the figures of the others
            record["error"] = f"{type(exc).__name__}: {exc}"
            self.note(f"section {name} failed: {record['error']}")
            traceback.print_exc()
        record["seconds"] = time.perf_counter() - started
        self.save()


def sync(device: torch.device) -> None:
    eb.sync(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def engine_args(opts: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """What benchmarks/engine.py's functions read from their command line."""
    args = eb.parse_args(["--model", opts.model, "--device", str(device), "--steps", str(opts.steps)])
    args.resolved_device = device
    args.warmup, args.repeats, args.flops = 1, opts.repeats, False
    args.compile_mode = opts.compile_mode
    args.resident = {}
    return args


def build_timed(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, float]:
    sync(device)
    before = eb.allocated(device)
    started = time.perf_counter()
    runner = eb.build(name, args, device, dtype)
    sync(device)
    seconds = time.perf_counter() - started
    args.resident[name] = eb.allocated(device) - before
    print(f"{name}: built in {seconds:.1f} s ({runner.applied})", flush=True)
    return runner, seconds


def release(device: torch.device) -> None:
    """Return the memory of models the caller has dropped its references to."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


SAMPLER_HEADERS = [
    "sampler",
    "finite",
    "model calls",
    "s/request",
    "calls/s (loop)",
    "UNet ms/call",
    "non-UNet ms/call",
    "non-UNet / UNet",
    "peak GiB",
]

# The engine benchmark's columns but three, for a narrower table of the device run.
MEASUREMENT_HEADERS = [h for h in eb.MEASUREMENT_HEADERS if h not in ("min s", "steps", "steps/s (request)")]


def measurement_json(m: eb.Measurement) -> dict[str, Any]:
    return {
        "engine": m.engine,
        "case": m.case,
        "working_size": list(m.working_size),
        "first_s": m.first_s,
        "times_s": m.times,
        "median_s": m.median_s if m.times else None,
        "steps_run": m.steps_run,
        "loop_steps_per_s": m.loop_steps_per_s,
        "peak_gib": m.peak_bytes / 2**30 if m.peak_bytes is not None else None,
        "tflop": m.flops / 1e12 if m.flops else None,
    }


def run_cases(
    runners: dict[str, Any], cases: list[eb.Case], args: argparse.Namespace, report: Report, per_run_s: float
) -> list[eb.Measurement]:
    results: list[eb.Measurement] = []
    for case in cases:
        need = per_run_s * len(runners) * (args.warmup + args.repeats)
        if report.clock.left() < need:
            report.note(f"case {case.name!r} skipped: {report.clock.left():.0f} s left, it needs ~{need:.0f} s")
            continue
        results += eb.measure_case(runners, case, args)
    return results


def section_engines(opts: argparse.Namespace, report: Report, device: torch.device, dtype: torch.dtype) -> Any:
    """Sections 1 and 2; returns our auto-knob engine for the later sections."""
    args = engine_args(opts, device)
    names = ["diffusers", "ours-plain", "ours"]
    runners: dict[str, Any] = {}
    with report.section("startup", opts.estimates["startup"]) as rec:
        if rec is None:
            return None
        rec["build_s"] = {}
        for name in names:
            runners[name], rec["build_s"][name] = build_timed(name, args, device, dtype)
        rec["resident_gib"] = {k: v / 2**30 for k, v in args.resident.items()} if device.type == "cuda" else None
    if "ours" not in runners:
        return None
    with report.section("engines", opts.estimates["engines"]) as rec:
        if rec is not None:
            cases = [eb.CASES["seed"], eb.CASES["square"]]
            results = run_cases(runners, cases, args, report, opts.per_request_s)
            rec["measurements"] = [measurement_json(m) for m in results]
            # One FLOP count of ours on the seed example (FlopCounterMode slows the run it counts).
            if results and report.clock.left() > 3 * opts.per_request_s:
                with eb.flop_counter(device) as total:
                    runners["ours"].run(eb.CASES["seed"], eb.CASES["seed"].image(), None)
                rec["ours_seed_tflop"] = total() / 1e12
                for m in results:
                    if m.engine == "ours" and m.case == eb.CASES["seed"].name:
                        m.flops = total()
            labels = {"diffusers": "diffusers", "ours-plain": "ours, knobs off", "ours": "ours, auto knobs"}
            rec["rows"] = eb.measurement_rows(results, MEASUREMENT_HEADERS, labels)
            print(table(MEASUREMENT_HEADERS, rec["rows"]), flush=True)
    ours = runners.pop("ours")
    runners.clear()
    release(device)
    return ours


def section_compile(opts: argparse.Namespace, report: Report, device: torch.device, dtype: torch.dtype) -> None:
    with report.section("compile", opts.estimates["compile"]) as rec:
        if rec is None:
            return
        args = engine_args(opts, device)
        runner, rec["build_s"] = build_timed("ours-compile", args, device, dtype)
        case = eb.CASES["seed"]
        image = case.image()
        sync(device)
        started = time.perf_counter()
        runner.run(case, image, None)  # compiles for this shape
        sync(device)
        rec["first_run_s"] = time.perf_counter() - started
        print(f"ours-compile ({opts.compile_mode}): first run {rec['first_run_s']:.1f} s", flush=True)
        m = eb.Measurement("ours-compile", case.name, runner.working_size(case), rec["first_run_s"])
        for _ in range(args.repeats):
            if report.clock.left() < 2 * opts.per_request_s:
                report.note("compile: timed runs cut short by the budget")
                break
            eb.timed_run(runner, case, image, m, args)
        if m.times:
            rec["measurement"] = measurement_json(m)
            rec["compile_s"] = rec["first_run_s"] - m.median_s
            rec["rows"] = eb.measurement_rows(
                [m], MEASUREMENT_HEADERS, {"ours-compile": f"ours + torch.compile ({opts.compile_mode})"}
            )
            print(table(MEASUREMENT_HEADERS, rec["rows"]), flush=True)
        del runner
    release(device)


def section_samplers(opts: argparse.Namespace, report: Report, ours: Any) -> None:
    engine: OutpaintEngine = ours.engine
    device = engine.device
    with report.section("samplers", opts.estimates["samplers"]) as rec:
        if rec is None:
            return
        case = eb.CASES["square"]
        rec["case"], rec["steps"], rec["results"] = case.name, opts.sampler_steps, {}
        rows = []
        for sampler in SAMPLERS:
            if report.clock.left() < opts.per_request_s * 2:
                report.note(f"samplers: stopped before {sampler}, budget spent")
                break
            peak_reset(device)
            started = time.perf_counter()
            split, finite, error = None, None, None
            try:
                split = split_run(engine, eb.case_request(case, opts.sampler_steps, sampler), device)
                finite = True
            except FloatingPointError as exc:  # the pipeline's own check of the decoded images
                finite, error = False, str(exc)
            except Exception as exc:  # one sampler's failure must not cost the others' figures
                error = f"{type(exc).__name__}: {exc}"
                report.note(f"samplers: {sampler} failed: {error}")
            wall = time.perf_counter() - started
            entry = {
                "finite": finite,
                "error": error,
                "wall_s": wall,
                "model_calls": split.steps + 1 if split else None,
                "calls_per_s": split.steps / split.loop_s if split and split.loop_s > 0 else None,
                "unet_ms_per_call": split.unet_ms_per_step if split else None,
                "non_unet_ms_per_call": split.non_unet_ms_per_step if split else None,
                "peak_gib": peak_gib(device),
            }
            rec["results"][sampler] = entry
            ratio = (
                entry["non_unet_ms_per_call"] / entry["unet_ms_per_call"]
                if split and entry["unet_ms_per_call"]
                else None
            )
            rows.append(
                [
                    sampler,
                    {True: "yes", False: "NO"}.get(finite, "error"),
                    entry["model_calls"],
                    wall,
                    entry["calls_per_s"],
                    entry["unet_ms_per_call"],
                    entry["non_unet_ms_per_call"],
                    f"{ratio * 100:.2f}%" if ratio is not None else None,
                    entry["peak_gib"],
                ]
            )
            print(f"{sampler}: {wall:.2f} s, finite {finite}", flush=True)
        rec["rows"] = rows
        print(table(SAMPLER_HEADERS, rows), flush=True)


def run_queue(engine: OutpaintEngine, requests: list[OutpaintRequest]) -> None:
    """Work off a queue of requests. BATCHING HOOK: when OutpaintEngine gains a batched entry point
    (several requests of one shape in one denoise loop), call it here with the whole queue, e.g.
    `engine.run_batch(requests)`, so the depth-4 and depth-8 rows measure the batching."""
    run_batch = getattr(engine, "run_batch", None)
    if callable(run_batch):
        run_batch(requests)
        return
    for r in requests:
        engine.run(r)


def section_throughput(opts: argparse.Namespace, report: Report, ours: Any) -> None:
    engine: OutpaintEngine = ours.engine
    device = engine.device
    with report.section("throughput", opts.estimates["throughput"]) as rec:
        if rec is None:
            return
        rec["mode"] = "batched (engine.run_batch)" if hasattr(engine, "run_batch") else "sequential"
        rec["depths"] = {}
        rows = []
        for depth in (1, 4, 8):
            if report.clock.left() < depth * opts.per_request_s * 1.5:
                report.note(f"throughput: depth {depth} skipped, budget spent")
                break
            request = eb.case_request(eb.CASES["seed"], opts.steps, "dpmpp_2m_sde_gpu")
            queue = [replace(request, seed=eb.SEED + i) for i in range(depth)]  # requests are frozen
            sync(device)
            started = time.perf_counter()
            run_queue(engine, queue)
            sync(device)
            seconds = time.perf_counter() - started
            per_min = depth / seconds * 60
            rec["depths"][str(depth)] = {"seconds": seconds, "images_per_min": per_min}
            rows.append([depth, rec["mode"], seconds, per_min, seconds / depth])
        rec["rows"] = rows
        print(table(["queue depth", "mode", "s for the queue", "images/min", "s/image"], rows), flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="random:tiny on the CPU, tiny step counts (plumbing)")
    parser.add_argument("--model", default=None, help="default random:sdxl (random:tiny with --cpu)")
    parser.add_argument("--budget-s", type=float, default=None, help="whole run (default 450 on GPU, 170 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per engine and case (default 3, cpu 1)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile section")
    parser.add_argument("--with-compile", action="store_true", help="--cpu: run the compile section too (~2 min)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON file")
    opts = parser.parse_args(argv)
    if not opts.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for the plumbing run")
    device = torch.device("cpu") if opts.cpu else torch.device("cuda")
    opts.model = opts.model or ("random:tiny" if opts.cpu else "random:sdxl")
    opts.budget_s = opts.budget_s or (170.0 if opts.cpu else 450.0)
    opts.repeats = opts.repeats or (1 if opts.cpu else 3)
    opts.steps = 8 if opts.cpu else 30
    opts.sampler_steps = 3 if opts.cpu else 20
    opts.estimates = dict(CPU_ESTIMATES if opts.cpu else GPU_ESTIMATES)
    # Rough seconds per request, for the guards inside the sections.
    opts.per_request_s = 2.0 if opts.cpu else 2.5
    if opts.cpu:
        torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    dtype = resolve_dtype("auto", device)

    clock = Clock(opts.budget_s)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    today = datetime.date.today().isoformat()
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(clock, out_dir / f"{slug(gpu)}-{today}.json")
    report.data.update(
        {
            "machine": machine_line(),
            "gpu": gpu,
            "date": today,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "model": opts.model,
            "dtype": str(dtype).removeprefix("torch."),
            "budget_s": opts.budget_s,
            "steps": opts.steps,
            "sampler_steps": opts.sampler_steps,
            "compile_mode": opts.compile_mode,
        }
    )
    print(f"# device check: {opts.model} on {device} ({gpu}), {report.data['dtype']}, budget {opts.budget_s:.0f} s")
    print(report.data["machine"], flush=True)
    ours = section_engines(opts, report, device, dtype)
    if ours is not None:
        section_samplers(opts, report, ours)
        section_throughput(opts, report, ours)
    else:
        report.note("no engine was built: the later sections need one")
    del ours
    release(device)
    # Last: its first run compiles for minutes, and only the guard before it bounds it.
    if opts.cpu and not opts.with_compile:
        report.note("--cpu: compile section left out (inductor on a CPU takes minutes; --with-compile runs it)")
        report.data["sections"]["compile"] = {"skipped": True}
    else:
        section_compile(opts, report, device, dtype)
    report.save()
    print_markdown(report.data)
    print(f"\nwrote {report.path} after {clock.elapsed():.0f} s")
    return 0


def print_markdown(data: dict[str, Any]) -> None:
    """The rows to paste into RESULTS.md."""
    print(f"\n# RESULTS.md rows: {data['gpu']}, {data['model']}, {data['dtype']}, {data['date']}\n")
    print(data["machine"] + "\n")
    sections = data["sections"]
    startup = sections.get("startup", {})
    compile_rec = sections.get("compile", {})
    if startup.get("build_s"):
        rows = [[name, s, (startup.get("resident_gib") or {}).get(name)] for name, s in startup["build_s"].items()]
        if compile_rec.get("build_s") is not None:
            rows.append(["ours-compile", compile_rec["build_s"], None])
        print(table(["engine", "build s (model + pipeline)", "resident GiB"], rows) + "\n")
    rows = list(sections.get("engines", {}).get("rows", [])) + list(compile_rec.get("rows", []))
    if rows:
        print(table(MEASUREMENT_HEADERS, rows) + "\n")
    if compile_rec.get("first_run_s") is not None:
        print(
            f"torch.compile ({data['compile_mode']}): first run {compile_rec['first_run_s']:.1f} s, "
            f"compile time ~{compile_rec.get('compile_s', math.nan):.1f} s for the seed example's shape\n"
        )
    samplers = sections.get("samplers", {})
    if samplers.get("rows"):
        print(f"{samplers['case']}, {samplers['steps']} steps, karras:\n")
        print(table(SAMPLER_HEADERS, samplers["rows"]) + "\n")
    throughput = sections.get("throughput", {})
    if throughput.get("rows"):
        print(table(["queue depth", "mode", "s for the queue", "images/min", "s/image"], throughput["rows"]) + "\n")
    for note in data["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    raise SystemExit(main())
