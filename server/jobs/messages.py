"""The few typed messages between the supervisor (API process or `beyond worker`) and the engine process.

The engine process knows nothing of the store: it gets a job's input bytes with the job and hands back
the encoded images, so the same engine process serves any store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.guard.images import ImageLimits
from server.jobs.contract import Delivery, JobParams, JobResult


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    device: str
    dtype: str
    limits: ImageLimits
    styles_dir: Path | None = None
    expansion_model: Path | None = None
    tokenizer_dir: Path | None = None
    cpu_threads: int | None = None
    # The speed knobs as text (auto | 1 | 0, and a compile mode): parsed in the worker, so the API
    # process never imports torch.
    channels_last: str = "auto"
    fuse_qkv: str = "auto"
    compile: str = "0"
    compile_sizes: str = ""  # WxH,... : the working sizes a compiled UNet is built for (empty: the default set)
    log_level: str = "info"
    log_format: str = "text"
    # Images (samples) denoised in one UNet batch; None: 4 on CUDA, 1 on a CPU (resolved in the worker).
    max_batch: int | None = None
    # Jobs the supervisor keeps in the worker beyond the running batch (decoded and prepared ahead).
    # False: one job at a time, nothing prepared ahead (and so nothing batched).
    prefetch: bool = True
    # The LoRA files requests may name, and the bytes of them the engine keeps loaded.
    lora_dir: Path | None = None
    lora_cache: int = 1 << 30


# supervisor -> worker
@dataclass(frozen=True)
class RunJob:
    job_id: str
    attempt: int
    params: JobParams
    image: bytes
    delivery: Delivery = field(default_factory=Delivery)  # how to encode the images


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# worker -> supervisor
@dataclass(frozen=True)
class Ready:
    info: dict[str, Any]
    max_batch: int = 1  # the resolved batch size: the supervisor keeps twice as many jobs in flight


@dataclass(frozen=True)
class LoadFailed:
    error: str


@dataclass(frozen=True)
class Started:
    job_id: str
    attempt: int


@dataclass(frozen=True)
class Progress:
    job_id: str
    attempt: int
    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    job_id: str
    attempt: int
    jpeg: bytes  # a small JPEG of the current latents


@dataclass(frozen=True)
class JobDone:
    job_id: str
    attempt: int
    result: JobResult
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    attempt: int
    error: str
    kind: str
