"""One process, one GPU, every figure RESULTS.md asks for, within a fixed time budget.

    bash benchmarks/device_check.sh            # a bare CUDA machine with no internet: installs .whl/, runs this
    bash benchmarks/device_check.sh --cpu      # the same code on a CPU with random:tiny (CI runs it)
    python -m benchmarks.device_check --summary FILE.json    # the summary of a run's saved JSON

Sections, in priority order. Each is skipped, with a note, when less time is left than its estimate,
and a loop inside one stops early the same way; the JSON is saved after every section and the
summary table printed last.

1. smoke: the versions, our engine (auto knobs) built, one seed-example request end to end
   (1024x1024 input, left 300, right 100), then once more timed.
2. engines: plain diffusers vs ours with every knob off and with the auto knobs on the seed
   example and the 1024x1024 canvas (`benchmarks/engine.py`'s code, engines interleaved), one FLOP
   count of ours, and the fp32 VAE decode with and without TF32 (time, and the 8-bit difference).
3. server: `beyond serve --model <model> --device <device>` from the installed packages: a v1
   request, a v2 request polled as the SDK polls (status every second), and 4 compatible v2
   requests at once behind a fifth (they share one fused batch); every output's size and content
   checked, the API latency next to the engine's time, and the batch's throughput against one job's.
4. batching: 4 seed-example jobs in one fused batch and each alone, in-process: the largest and
   mean 8-bit difference of each job's image (the batched-vs-alone tolerance) and the times.
5. samplers: all 18 on the 1024x1024 canvas: finite output, model calls/s, UNet and non-UNet ms per call.
6. compile: the UNet compiled for the working sizes of the 1024x1024 canvas and of the seed example
   (as the server's worker does at start, mode `default` unless --compile-mode), seconds per size,
   then the 1024x1024 canvas compiled vs not, and whether any request compiled. Last: a compile
   cannot be interrupted, only the guard before each size bounds it. On a CPU dynamo traces with
   its eager compiler unless --compile-backend inductor (minutes even for random:tiny).

Writes `<out>/<gpu-name>-<date>.json` and prints the markdown rows for RESULTS.md and the summary.
--strict (CI): exit status 1 when a section failed or was skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import platform
import re
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import engine as eb
from benchmarks.common import machine_line, table
from benchmarks.noise import split_run
from models.canvas import working_size
from models.compile_sizes import default_sizes, snap
from models.devices import resolve_dtype
from models.engine import OutpaintEngine
from models.names import SAMPLERS
from models.pipeline import OutpaintPipeline
from models.speed import SpeedOptions, allow_tf32

SECTIONS = ("smoke", "engines", "server", "batching", "samplers", "compile")
# Seconds each section is expected to need (the guard skips it when less is left): on an H100 with
# random:sdxl in fp16 (estimated from FLOPs, benchmarks/README.md), and on a 2-core CPU with random:tiny.
GPU_ESTIMATES = {"smoke": 45, "engines": 75, "server": 70, "batching": 30, "samplers": 60, "compile": 90}
CPU_ESTIMATES = {"smoke": 20, "engines": 60, "server": 60, "batching": 20, "samplers": 45, "compile": 40}
SDK_POLL_INTERVAL = 1.0  # seconds between the SDK's status polls (segmind 1.3.0's default)


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


def release(device: torch.device) -> None:
    """Return the memory of models the caller has dropped its references to."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def versions() -> dict[str, str]:
    import diffusers
    import huggingface_hub
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def image_array(picture: Any) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


# -- 1. smoke -------------------------------------------------------------------------------------


def section_smoke(opts: argparse.Namespace, report: Report, args: argparse.Namespace) -> Any:
    """Our engine (auto knobs), for every later section; None when it could not be built."""
    built: dict[str, Any] = {}
    with report.section("smoke", opts.estimates["smoke"]) as rec:
        if rec is None:
            return None
        rec["versions"] = versions()
        print(", ".join(f"{k} {v}" for k, v in rec["versions"].items()), flush=True)
        ours, rec["build_s"] = build_timed("ours", args, opts.device, opts.dtype)
        built["ours"] = ours
        rec["applied"] = ours.engine.pipeline.speedups.as_dict()
        case = eb.CASES["seed"]
        image = case.image()
        for key in ("first_request_s", "second_request_s"):
            sync(opts.device)
            started = time.perf_counter()
            picture = ours.run(case, image, None)
            sync(opts.device)
            rec[key] = time.perf_counter() - started
        rec["output_size"] = list(picture.size)
        if picture.size != case.pad.canvas_size(case.width, case.height):
            raise AssertionError(f"the output is {picture.size}, not the padded canvas")
        if image_array(picture).std() == 0:
            raise AssertionError("the output is one flat colour")
        print(f"seed example: first request {rec['first_request_s']:.2f} s, then {rec['second_request_s']:.2f} s")
    return built.get("ours")


# -- 2. engines -----------------------------------------------------------------------------------

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


def vae_tf32(engine: OutpaintEngine, device: torch.device, repeats: int) -> dict[str, Any]:
    """The VAE decode of a seed-example latent with fp32 products in full fp32 and in TF32 (on a CPU the
    setting changes nothing: the figures there only prove the code)."""
    pipe = engine.pipeline
    width, height = pipe.snap(working_size(1424, 1024, pipe.native_area), (1424, 1024))
    generator = torch.Generator().manual_seed(eb.SEED)
    latents = torch.randn(1, 4, height // pipe.vae_scale, width // pipe.vae_scale, generator=generator)
    latents = latents.to(device, pipe.dtype)
    runs: dict[str, list[float]] = {"fp32": [], "tf32": []}
    images: dict[str, np.ndarray] = {}
    try:
        with torch.no_grad():
            pipe.decode_latents(latents)  # warm-up (cuDNN picks its kernels)
            # Interleaved, so a change in the machine's load or clocks touches both alike.
            for _ in range(max(2, repeats)):
                for name, on in (("fp32", False), ("tf32", True)):
                    allow_tf32(on)
                    sync(device)
                    started = time.perf_counter()
                    decoded = pipe.decode_latents(latents)
                    sync(device)
                    runs[name].append(time.perf_counter() - started)
                    images[name] = (decoded[0].permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).astype(np.int16)
    finally:
        allow_tf32(pipe.speedups.tf32)  # as the engine had it
    times = {name: statistics.median(values) for name, values in runs.items()}
    difference = np.abs(images["fp32"] - images["tf32"])
    return {
        "vae_dtype": str(pipe.vae_dtype).removeprefix("torch."),
        "size": [width, height],
        "decode_s_fp32": times["fp32"],
        "decode_s_tf32": times["tf32"],
        "speedup": times["fp32"] / times["tf32"],
        "max_diff_8bit": int(difference.max()),
        "mean_diff_8bit": float(difference.mean()),
        "engine_uses_tf32": pipe.speedups.tf32,
    }


def section_engines(opts: argparse.Namespace, report: Report, args: argparse.Namespace, ours: Any) -> None:
    with report.section("engines", opts.estimates["engines"]) as rec:
        if rec is None:
            return
        runners: dict[str, Any] = {}
        rec["build_s"] = {}
        for name in ("diffusers", "ours-plain"):
            runners[name], rec["build_s"][name] = build_timed(name, args, opts.device, opts.dtype)
        runners["ours"] = ours
        results: list[eb.Measurement] = []
        for case in (eb.CASES["seed"], eb.CASES["square"]):
            need = opts.per_request_s * len(runners) * (args.warmup + args.repeats)
            if report.clock.left() < need:
                report.note(f"case {case.name!r} skipped: {report.clock.left():.0f} s left, it needs ~{need:.0f} s")
                continue
            results += eb.measure_case(runners, case, args)
        rec["measurements"] = [measurement_json(m) for m in results]
        # One FLOP count of ours on the seed example (FlopCounterMode slows the run it counts).
        if results and report.clock.left() > 3 * opts.per_request_s:
            with eb.flop_counter(opts.device) as total:
                ours.run(eb.CASES["seed"], eb.CASES["seed"].image(), None)
            rec["ours_seed_tflop"] = total() / 1e12
            for m in results:
                if m.engine == "ours" and m.case == eb.CASES["seed"].name:
                    m.flops = total()
        labels = {"diffusers": "diffusers", "ours-plain": "ours, knobs off", "ours": "ours, auto knobs"}
        rec["rows"] = eb.measurement_rows(results, MEASUREMENT_HEADERS, labels)
        print(table(MEASUREMENT_HEADERS, rec["rows"]), flush=True)
        if opts.device.type == "cuda" and ours.engine.pipeline.speedups.tf32:
            report.note("TF32 is a process-wide setting: diffusers' fp32 VAE decode ran with it too")
        runners.clear()
        release(opts.device)
        rec["vae_tf32"] = vae_tf32(ours.engine, opts.device, opts.repeats)
        print(f"VAE decode, fp32 vs TF32: {rec['vae_tf32']}", flush=True)


# -- 3. server ------------------------------------------------------------------------------------


def seconds_between(start: str, end: str) -> float:
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def check_output(data: bytes, size: tuple[int, int]) -> None:
    from PIL import Image

    picture = Image.open(io.BytesIO(data))
    picture.load()
    if picture.size != size:
        raise AssertionError(f"an output is {picture.size}, not {size}")
    if image_array(picture).std() == 0:
        raise AssertionError("an output is one flat colour")


def sdk_run(client: Any, base: str, body: dict) -> dict[str, Any]:
    """What `segmind`'s `run` does: submit to v2, poll status_url every second until COMPLETED or
    FAILED, then GET response_url (each URL as the server gave it)."""
    started = time.perf_counter()
    submitted = client.post(f"{base}/v2/seg-beyond", json=body)
    submitted.raise_for_status()
    links = submitted.json()
    polls = 0
    while True:
        polls += 1
        state = client.get(links["status_url"]).json().get("status")
        if state in ("COMPLETED", "FAILED"):
            break
        time.sleep(SDK_POLL_INTERVAL)
    result = client.get(links["response_url"]).json()
    latency = time.perf_counter() - started
    if result.get("status") != "COMPLETED":
        raise AssertionError(f"v2 request {links['request_id']} ended {result}")
    return {"latency_s": latency, "polls": polls, "result": result}


def submit(client: Any, base: str, body: dict) -> str:
    response = client.post(f"{base}/v2/seg-beyond", json=body)
    response.raise_for_status()
    return response.json()["request_id"]


def wait_all(client: Any, base: str, ids: list[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    results: dict[str, dict] = {}
    while len(results) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(ids) - len(results)} jobs not done after {timeout:.0f} s")
        for request_id in ids:
            if request_id not in results:
                status = client.get(f"{base}/v2/requests/{request_id}/status").json()["status"]
                if status in ("COMPLETED", "FAILED"):
                    results[request_id] = client.get(f"{base}/v2/requests/{request_id}").json()
        time.sleep(0.05)
    return results


def section_server(opts: argparse.Namespace, report: Report) -> None:
    import httpx

    from tests.helpers import ServerProcess, b64, encode

    with report.section("server", opts.estimates["server"]) as rec:
        if rec is None:
            return
        case = eb.CASES["seed"]
        size = case.pad.canvas_size(case.width, case.height)
        body = {
            "input_image": b64(encode(case.image())),
            "prompt": eb.PROMPT,
            "steps": opts.api_steps,
            "left": case.pad.left,
            "right": case.pad.right,
            "seed": eb.SEED,
            "styles": "",
        }
        # One fused batch of 4 images at most; the CPU run keeps one torch thread (a shared 2-core machine).
        env = {"BEYOND_MAX_BATCH": "4", "BEYOND_LOG_LEVEL": "info"}
        if opts.device.type == "cuda":
            env["BEYOND_CPU_THREADS"] = "8"
        with tempfile.TemporaryDirectory(prefix="beyond-device-check-") as folder:
            server = ServerProcess(Path(folder), model=opts.model, env=env, device=str(opts.device))
            started = time.perf_counter()
            server.start()
            try:
                server.wait_ready(timeout=max(30.0, min(240.0, report.clock.left() - 30)))
                rec["ready_s"] = time.perf_counter() - started
                print(f"server ready in {rec['ready_s']:.1f} s", flush=True)
                with httpx.Client(timeout=max(60.0, report.clock.left())) as client:
                    server_requests(rec, client, server.url, body, size)
                log = server.log_path.read_text(errors="replace")
                rec["batches"] = [
                    len(ids.split()) for ids in re.findall(r"denoising \d+ jobs in one batch: ([0-9a-f ]+)", log)
                ]
            finally:
                server.stop()
        print(table(["request", "API latency s", "engine s", "overhead s"], rec["rows"]), flush=True)
        print(
            f"4 at once: batches {rec['batches']}; {rec['batch']['images_per_s']:.3g} images/s against "
            f"{rec['batch']['depth1_images_per_s']:.3g} alone ({rec['batch']['vs_depth1']:.2f}x)",
            flush=True,
        )


def server_requests(rec: dict[str, Any], client: Any, base: str, body: dict, size: tuple[int, int]) -> None:
    # v1: the image in the answer; the engine's own seconds in a header.
    started = time.perf_counter()
    answer = client.post(f"{base}/v1/seg-beyond", json={**body, "seed": eb.SEED + 1})
    latency = time.perf_counter() - started
    if answer.status_code != 200:
        raise AssertionError(f"v1 answered {answer.status_code}: {answer.text[:300]}")
    check_output(answer.content, size)
    engine_s = float(answer.headers["x-inference-time"])
    rec["v1"] = {"latency_s": latency, "engine_s": engine_s}
    # v2 as the SDK runs it.
    v2 = sdk_run(client, base, {**body, "seed": eb.SEED + 2})
    result = v2["result"]
    check_output(client.get(result["output"]).content, size)
    depth1_s = seconds_between(result["started_at"], result["completed_at"])
    rec["v2"] = {"latency_s": v2["latency_s"], "engine_s": result["metrics"]["inference_time"], "polls": v2["polls"]}
    # 4 compatible jobs at once, behind a fifth: they wait together, then share one batch.
    blocker = submit(client, base, {**body, "seed": eb.SEED + 3})
    sent = time.perf_counter()
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda s=s: ids.append(submit(client, base, {**body, "seed": eb.SEED + 10 + s})))
        for s in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = wait_all(client, base, [blocker, *ids], timeout=max(60.0, 20 * (rec["v1"]["latency_s"] + 1)))
    batch = [results[i] for i in ids]
    for job in batch:
        if job["status"] != "COMPLETED":
            raise AssertionError(f"a batched job ended {job}")
        check_output(client.get(job["output"]).content, size)
    span = seconds_between(min(j["started_at"] for j in batch), max(j["completed_at"] for j in batch))
    rec["batch"] = {
        "jobs": len(batch),
        "wall_s": time.perf_counter() - sent,
        "span_s": span,
        "images_per_s": len(batch) / span,
        "depth1_s": depth1_s,
        "depth1_images_per_s": 1 / depth1_s,
        "vs_depth1": len(batch) / span * depth1_s,
        "engine_s": [j["metrics"]["inference_time"] for j in batch],
    }
    rec["rows"] = [
        ["v1", latency, engine_s, latency - engine_s],
        [
            "v2, SDK polling (1 s)",
            rec["v2"]["latency_s"],
            rec["v2"]["engine_s"],
            rec["v2"]["latency_s"] - rec["v2"]["engine_s"],
        ],
    ]


# -- 4. batching ----------------------------------------------------------------------------------


def section_batching(opts: argparse.Namespace, report: Report, ours: Any) -> None:
    engine: OutpaintEngine = ours.engine
    device = opts.device
    with report.section("batching", opts.estimates["batching"]) as rec:
        if rec is None:
            return
        request = eb.case_request(eb.CASES["seed"], opts.steps, "dpmpp_2m_sde_gpu")
        requests = [replace(request, seed=eb.SEED + i) for i in range(4)]  # requests are frozen
        pipe = engine.pipeline
        fused_before = pipe.fused_batches
        pipe.fused_batches = True  # the accelerator's path, also on a CPU (where it is off by default)
        try:
            alone, alone_s = [], []
            for request in requests:
                sync(device)
                started = time.perf_counter()
                alone.append(image_array(engine.run(request).images[0]))
                sync(device)
                alone_s.append(time.perf_counter() - started)
            peak_reset(device)
            sync(device)
            started = time.perf_counter()
            jobs = [engine.prepare(request) for request in requests]
            if len({job.batch_key for job in jobs}) != 1:
                raise AssertionError("the 4 jobs cannot share a batch")
            parts = engine.denoise(jobs)
            batched = [image_array(engine.finish(job, part).images[0]) for job, part in zip(jobs, parts, strict=True)]
            sync(device)
            batch_s = time.perf_counter() - started
        finally:
            pipe.fused_batches = fused_before
        differences = [np.abs(b - a) for b, a in zip(batched, alone, strict=True)]
        rec.update(
            {
                "jobs": len(requests),
                "steps": opts.steps,
                "max_diff_8bit": [int(d.max()) for d in differences],
                "mean_diff_8bit": [float(d.mean()) for d in differences],
                "share_of_pixels_differing": [float((d > 0).any(axis=-1).mean()) for d in differences],
                "alone_s": alone_s,
                "batch_s": batch_s,
                "speedup": sum(alone_s) / batch_s,
                "batch_peak_gib": peak_gib(device),
            }
        )
        print(
            f"batched vs alone, 8-bit: max {max(rec['max_diff_8bit'])},"
            f" mean {statistics.mean(rec['mean_diff_8bit']):.4f};"
            f" 4 alone {sum(alone_s):.2f} s, one batch {batch_s:.2f} s ({rec['speedup']:.2f}x)",
            flush=True,
        )


# -- 5. samplers ----------------------------------------------------------------------------------

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
        failed = [name for name, entry in rec["results"].items() if not entry["finite"]]
        if failed:
            raise AssertionError(f"samplers without a finite image: {', '.join(failed)}")


# -- 6. compile -----------------------------------------------------------------------------------


def default_snap(size: tuple[int, int], canvas: tuple[int, int], native_area: int) -> tuple[int, int]:
    """The working size a server with compile on (and the default size set) uses for `canvas`."""
    return snap(canvas, default_sizes(native_area)) if size else size


@contextlib.contextmanager
def compile_backend(name: str) -> Iterator[None]:
    """The UNet's compile with another of dynamo's compilers than inductor (the CPU run: `eager` traces
    for real, in seconds, and runs the traced graph as it is)."""
    if name == "inductor":
        yield
        return
    from diffusers import UNet2DConditionModel
    from torch import nn

    def compile(self: nn.Module, **kwargs: Any) -> None:
        nn.Module.compile(self, backend=name, dynamic=kwargs.get("dynamic"))

    UNet2DConditionModel.compile = compile  # type: ignore[method-assign]
    try:
        yield
    finally:
        del UNet2DConditionModel.compile


def section_compile(opts: argparse.Namespace, report: Report, args: argparse.Namespace, ours: Any) -> None:
    from torch._dynamo.utils import counters

    with report.section("compile", opts.estimates["compile"]) as rec:
        if rec is None:
            return
        device = opts.device
        square, seed = eb.CASES["square"], eb.CASES["seed"]
        native = ours.engine.pipeline.native_area
        # The square canvas's size first: it is timed against the plain engine at the very same size.
        # The seed example's compiled size second: its compile time is a second size's (the warm-up's cost per size).
        square_size = working_size(*square.pad.canvas_size(square.width, square.height), native)
        seed_canvas = seed.pad.canvas_size(seed.width, seed.height)
        seed_size = default_snap(working_size(*seed_canvas, native), seed_canvas, native)
        sizes = (square_size,) if seed_size == square_size else (square_size, seed_size)
        rec.update({"mode": opts.compile_mode, "backend": opts.compile_backend, "sizes": [list(s) for s in sizes]})
        speed = SpeedOptions(compile=True, compile_mode=opts.compile_mode, compile_sizes=sizes)
        started = time.perf_counter()
        with compile_backend(opts.compile_backend):
            pipeline = OutpaintPipeline(eb.load_model(opts.model, device), device, opts.dtype, speed)
        compiled = OutpaintEngine(pipeline, opts.model)
        rec["build_s"] = time.perf_counter() - started
        rec["compile_s"] = {}
        for size in sizes:
            if rec["compile_s"] and report.clock.left() < opts.estimates["compile"]:
                report.note(f"compile: {size[0]}x{size[1]} not compiled, budget spent")
                break
            rec["compile_s"][f"{size[0]}x{size[1]}"] = pipeline.warm_up([size])[size]
            print(f"compiled for {size[0]}x{size[1]} in {rec['compile_s'][f'{size[0]}x{size[1]}']:.1f} s", flush=True)
        graphs = counters["stats"]["unique_graphs"]
        image = square.image()
        request = eb.case_request(square, opts.steps, "dpmpp_2m_sde_gpu", image=image)
        times: dict[str, list[float]] = {"compiled": [], "eager": []}
        for _ in range(opts.repeats + 1):  # the first round is a warm-up of everything but the UNet
            if report.clock.left() < 3 * opts.per_request_s:
                report.note("compile: timed runs cut short by the budget")
                break
            for name, engine in (("compiled", compiled), ("eager", ours.engine)):
                sync(device)
                begun = time.perf_counter()
                engine.run(request)
                sync(device)
                times[name].append(time.perf_counter() - begun)
        rec["request_compiles"] = counters["stats"]["unique_graphs"] - graphs
        if rec["request_compiles"]:
            raise AssertionError(f"{rec['request_compiles']} graphs were compiled during requests")
        if len(times["compiled"]) > 1:
            rec["compiled_s"] = statistics.median(times["compiled"][1:])
            rec["eager_s"] = statistics.median(times["eager"][1:])
            rec["speedup"] = rec["eager_s"] / rec["compiled_s"]
            print(
                f"1024x1024 canvas: compiled {rec['compiled_s']:.2f} s, not compiled {rec['eager_s']:.2f} s "
                f"({rec['speedup']:.2f}x); no graph compiled during the requests",
                flush=True,
            )
        del compiled, pipeline
    release(opts.device)


# -- the run --------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="random:tiny on the CPU, few steps (the plumbing)")
    parser.add_argument("--model", default=None, help="default random:sdxl (random:tiny with --cpu)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run (default 330 on GPU, 420 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per engine and case (default 2, cpu 1)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile section")
    parser.add_argument("--compile-backend", default=None, help="dynamo compiler (default inductor; eager with --cpu)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--strict", action="store_true", help="exit status 1 if a section failed or was skipped")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON file")
    parser.add_argument("--summary", type=Path, default=None, help="print the summary of this saved JSON, run nothing")
    opts = parser.parse_args(argv)
    opts.sections = [s.strip() for s in opts.sections.split(",") if s.strip()]
    if set(opts.sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(set(opts.sections) - set(SECTIONS))}")
    if opts.summary is None and not opts.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for the plumbing run")
    opts.device = torch.device("cpu") if opts.cpu else torch.device("cuda")
    opts.model = opts.model or ("random:tiny" if opts.cpu else "random:sdxl")
    opts.budget_s = opts.budget_s or (420.0 if opts.cpu else 330.0)
    opts.repeats = opts.repeats or (1 if opts.cpu else 2)
    opts.compile_backend = opts.compile_backend or ("eager" if opts.cpu else "inductor")
    opts.steps = 8 if opts.cpu else 30
    opts.api_steps = 20 if opts.cpu else 30  # the API takes 20 to 100
    opts.sampler_steps = 3 if opts.cpu else 20
    opts.estimates = dict(CPU_ESTIMATES if opts.cpu else GPU_ESTIMATES)
    opts.per_request_s = 2.0 if opts.cpu else 2.5  # rough seconds per request, for the guards inside sections
    opts.dtype = resolve_dtype("auto", opts.device)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.summary is not None:
        data = json.loads(opts.summary.read_text())
        print_markdown(data)
        print_summary(data)
        return 0
    if opts.cpu:
        torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    clock = Clock(opts.budget_s)
    gpu = torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else "cpu"
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
            "dtype": str(opts.dtype).removeprefix("torch."),
            "budget_s": opts.budget_s,
            "steps": opts.steps,
            "api_steps": opts.api_steps,
            "sampler_steps": opts.sampler_steps,
            "compile_mode": opts.compile_mode,
            "compile_backend": opts.compile_backend,
        }
    )
    print(
        f"# device check: {opts.model} on {opts.device} ({gpu}), {report.data['dtype']}, budget {opts.budget_s:.0f} s"
    )
    print(report.data["machine"], flush=True)
    args = engine_args(opts, opts.device)
    wanted = set(opts.sections)
    ours = section_smoke(opts, report, args)
    later = [s for s in SECTIONS[1:] if s in wanted]
    if ours is None:
        report.note("no engine was built: the sections after smoke need one")
        for name in later:
            report.data["sections"][name] = {"skipped": True}
    else:
        steps = {
            "engines": lambda: section_engines(opts, report, args, ours),
            "server": lambda: section_server(opts, report),
            "batching": lambda: section_batching(opts, report, ours),
            "samplers": lambda: section_samplers(opts, report, ours),
            "compile": lambda: section_compile(opts, report, args, ours),
        }
        for name in later:
            steps[name]()
            release(opts.device)
    report.save()
    print_markdown(report.data)
    print(f"\nwrote {report.path} after {clock.elapsed():.0f} s")
    print_summary(report.data)
    bad = [
        n
        for n in opts.sections
        if report.data["sections"].get(n, {}).get("skipped", True) or "error" in report.data["sections"][n]
    ]
    if opts.strict and bad:
        print(f"\nFAILED or skipped: {', '.join(bad)}")
        return 1
    return 0


def print_markdown(data: dict[str, Any]) -> None:
    """The rows to paste into RESULTS.md."""
    print(f"\n# RESULTS.md rows: {data['gpu']}, {data['model']}, {data['dtype']}, {data['date']}\n")
    print(data["machine"] + "\n")
    sections = data["sections"]
    rows = list(sections.get("engines", {}).get("rows", []))
    if rows:
        print(table(MEASUREMENT_HEADERS, rows) + "\n")
    tf32 = sections.get("engines", {}).get("vae_tf32")
    if tf32:
        print(
            f"VAE decode {tf32['size'][0]}x{tf32['size'][1]} ({tf32['vae_dtype']}):"
            f" {tf32['decode_s_fp32']:.3f} s in fp32,"
            f" {tf32['decode_s_tf32']:.3f} s with TF32 ({tf32['speedup']:.2f}x); 8-bit difference max"
            f" {tf32['max_diff_8bit']}, mean {tf32['mean_diff_8bit']:.4f}\n"
        )
    server = sections.get("server", {})
    if server.get("rows"):
        print(table(["request", "API latency s", "engine s", "overhead s"], server["rows"]) + "\n")
    batching = sections.get("batching", {})
    if batching.get("max_diff_8bit"):
        print(
            f"batched vs alone ({batching['jobs']} seed-example jobs, {batching['steps']} steps): 8-bit difference"
            f" max {max(batching['max_diff_8bit'])}, mean {statistics.mean(batching['mean_diff_8bit']):.4f}; one batch"
            f" {batching['batch_s']:.2f} s vs {sum(batching['alone_s']):.2f} s alone ({batching['speedup']:.2f}x)\n"
        )
    samplers = sections.get("samplers", {})
    if samplers.get("rows"):
        print(f"{samplers['case']}, {samplers['steps']} steps, karras:\n")
        print(table(SAMPLER_HEADERS, samplers["rows"]) + "\n")
    compiled = sections.get("compile", {})
    if compiled.get("compile_s"):
        per_size = ", ".join(f"{k} {v:.1f} s" for k, v in compiled["compile_s"].items())
        line = f"torch.compile ({compiled['mode']}, {compiled['backend']}): {per_size}"
        if compiled.get("speedup"):
            line += (
                f"; 1024x1024 canvas {compiled['compiled_s']:.2f} s compiled,"
                f" {compiled['eager_s']:.2f} s not ({compiled['speedup']:.2f}x)"
            )
        print(line + "\n")
    for note in data["notes"]:
        print(f"- {note}")


def summary_cell(name: str, record: dict[str, Any]) -> str:
    """The one figure per section that says most."""
    if name == "smoke" and "second_request_s" in record:
        return f"seed example {record['second_request_s']:.2f} s (first {record['first_request_s']:.2f} s)"
    if name == "engines" and record.get("measurements"):
        ours = [m for m in record["measurements"] if m["engine"] == "ours" and m["median_s"]]
        base = {
            m["case"]: m["median_s"] for m in record["measurements"] if m["engine"] == "diffusers" and m["median_s"]
        }
        return "; ".join(
            f"{m['case'].split(' (')[0]}: {m['median_s']:.2f} s, {base[m['case']] / m['median_s']:.2f}x diffusers"
            for m in ours
            if m["case"] in base
        )
    if name == "server" and "batch" in record:
        return (
            f"v1 {record['v1']['latency_s']:.2f} s (engine {record['v1']['engine_s']:.2f}); "
            f"4 at once {record['batch']['vs_depth1']:.2f}x depth 1, batches {record.get('batches')}"
        )
    if name == "batching" and "max_diff_8bit" in record:
        return f"8-bit max diff {max(record['max_diff_8bit'])}; {record['speedup']:.2f}x"
    if name == "samplers" and record.get("results"):
        finite = sum(1 for r in record["results"].values() if r["finite"])
        return f"{finite}/{len(record['results'])} finite"
    if name == "compile" and record.get("compile_s"):
        text = ", ".join(f"{k}: {v:.0f} s" for k, v in record["compile_s"].items())
        return text + (f"; {record['speedup']:.2f}x" if record.get("speedup") else "")
    return ""


def print_summary(data: dict[str, Any]) -> None:
    rows = []
    for name in SECTIONS:
        record = data["sections"].get(name)
        if record is None:
            rows.append([name, "not run", None, ""])
            continue
        status = "skipped" if record.get("skipped") else ("FAILED" if "error" in record else "ok")
        rows.append([name, status, record.get("seconds"), record.get("error") or summary_cell(name, record)])
    total = data.get("total_s", math.nan)
    print(f"\n# summary: {data['gpu']}, {data['model']}, {total:.0f} s of {data['budget_s']:.0f}\n")
    print(table(["section", "status", "s", "result"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
