"""What a LoRA costs the engine: loading one, switching sets, and each denoising step with a set active.

    python -m benchmarks.lora                                   # random:tiny on the CPU, about a minute
    python -m benchmarks.lora --model random:sdxl --device cuda  # on a GPU: full-size SDXL shapes, fp16
    python -m benchmarks.lora --model random:sdxl --device cuda --compile   # and under torch.compile

Two kohya-format LoRAs of rank `--rank` are written for the model (every attention, feed-forward and
projection layer of the UNet's transformers, and the text encoders' attention and MLP layers: what a
kohya SDXL LoRA patches), then:

1. load: reading a file into the cache (a miss), median over fresh caches.
2. switch: the time to make the model carry another set (text encoders and UNet, as a job's
   prepare and denoise do), for none -> A, A -> B (both patched, other values), B -> A+B (two LoRAs),
   A+B -> none; median of `--repeats` rounds, the device synchronised.
3. per step: the denoising loop of one prepared job (30 steps by default) with no LoRA and with A+B
   active, alternated (each first in turn), median; the difference is the per-step cost of an active set.
4. memory: the bytes of original weights kept while A+B is active, and the cache's bytes.
With --compile the UNet is compiled first (torch.compile, mode default); the table then also says how
many graphs dynamo made across all the sets (1: no recompilation on a switch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import machine_line, table
from models.engine import OutpaintEngine, OutpaintRequest
from models.params import LoraRef
from models.speed import SpeedOptions
from tests.helpers import smooth_image
from tests.lora_helpers import write_kohya


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (mode default)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 10 steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 3, 10
    torch.set_num_threads(args.threads)

    speed = SpeedOptions(compile=args.compile, compile_mode="default") if args.compile else None
    started = time.perf_counter()
    engine = OutpaintEngine.load(args.model, args.device, args.dtype, speed)
    device = engine.device
    print(f"{machine_line()}; {args.model} on {device}/{str(engine.dtype).removeprefix('torch.')}"
          f" built in {time.perf_counter() - started:.1f} s")  # fmt: skip

    from models.lora_weights import LoraCache, model_layout

    layout = model_layout(engine.pipeline.c)
    with tempfile.TemporaryDirectory() as folder:
        for name, seed in (("a", 1), ("b", 2)):
            write_kohya(Path(folder, f"{name}.safetensors"), seed=seed, rank=args.rank, model=layout, strength=0.01)
        loras = engine.enable_loras(folder, cache_bytes=1 << 40)
        file_bytes = Path(folder, "a.safetensors").stat().st_size

        # 1. load (a cache miss)
        loads = []
        for _ in range(args.repeats):
            cache = LoraCache(loras.library, device, engine.dtype, budget=1 << 40)
            loads.append(timed(device, lambda cache=cache: cache.get("a")))
        layers = len(loras.library.read("a").layers)

        # 2. switches, both parts, as prepare (text encoders) and denoise (UNet) make them
        def switch(refs: tuple[LoraRef, ...]) -> Callable[[], None]:
            def work() -> None:
                with loras.text_encoders(refs):
                    pass
                loras.activate_unet(refs)

            return work

        a, b = (LoraRef("a", 1.0),), (LoraRef("b", 0.8),)
        both = (LoraRef("a", 1.0), LoraRef("b", 0.8))
        cases = [("none -> A", (), a), ("A -> B", a, b), ("B -> A+B", b, both), ("A+B -> none", both, ())]
        switches: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        switch(both)()  # warm: every file in the cache
        for _ in range(args.repeats):
            for label, before, after in cases:
                switch(before)()
                switches[label].append(timed(device, switch(after)))
        switch(both)()
        kept = loras.unet.patched + loras.text.patched
        patched_layers = len(loras.unet._originals) + len(loras.text._originals)

        # 3. per step: one prepared job denoised with no set and with A+B, alternated
        request = OutpaintRequest(
            image=smooth_image(768, 1024) if args.model != "random:tiny" else smooth_image(192, 256),
            prompt="a quiet beach",
            styles=(),
            seed=3,
            steps=args.steps,
            right=256 if args.model != "random:tiny" else 64,
        )
        loop: dict[str, list[float]] = {"no LoRA": [], "A+B active": []}
        graphs_before = _graphs()
        outputs = {}
        for refs, label in (((), "no LoRA"), (both, "A+B active")):  # warm-up (and compile) of each
            job = engine.prepare(OutpaintRequest(**{**request.values(), "image": request.image, "loras": refs}))
            (outputs[label],) = engine.denoise([job])
        # The set reaches the (compiled) UNet: its images are not the plain model's.
        differs = not torch.equal(outputs["no LoRA"], outputs["A+B active"])
        for round_ in range(args.repeats):
            order = (((), "no LoRA"), (both, "A+B active"))
            for refs, label in order if round_ % 2 == 0 else order[::-1]:  # each goes first in turn
                job = engine.prepare(OutpaintRequest(**{**request.values(), "image": request.image, "loras": refs}))
                loras.activate_unet(refs)  # the switch is not part of the loop's time
                loop[label].append(timed(device, lambda job=job: engine.denoise([job])))
        graphs = _graphs() - graphs_before if args.compile else None

    ms = {label: 1000 * statistics.median(times) for label, times in switches.items()}
    print()
    print(f"LoRA: rank {args.rank}, {layers} layers, {file_bytes / 2**20:.1f} MiB file (fp16)")
    rows = [["load (cache miss)", 1000 * statistics.median(loads), f"{file_bytes / 2**20:.1f} MiB read"]]
    rows += [[f"switch {label}", value, ""] for label, value in ms.items()]
    rows.append(["originals kept with A+B active", None, f"{kept / 2**20:.1f} MiB, {patched_layers} layers"])
    rows.append(["cache", None, f"{loras.cache.nbytes / 2**20:.1f} MiB (A and B)"])
    print(table(["what", "ms (median)", "notes"], rows))
    print()
    per_step = {label: 1000 * statistics.median(times) / args.steps for label, times in loop.items()}
    overhead = per_step["A+B active"] / per_step["no LoRA"] - 1
    print(
        table(
            ["denoising", "ms/step (median)", "vs no LoRA"],
            [[label, value, f"{100 * (value / per_step['no LoRA'] - 1):+.1f}%"] for label, value in per_step.items()],
        )
    )
    print(f"\nimages with A+B differ from the plain model's: {differs}")
    print(f"per-step overhead of an active set: {100 * overhead:+.1f}%", end="")
    print(f"; graphs compiled over both sets: {graphs}" if graphs is not None else "")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


if __name__ == "__main__":
    main()
