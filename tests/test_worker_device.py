"""The worker's CUDA calls name the engine's own device (one worker per GPU: cuda:1 is not cuda:0).

No GPU here: torch.cuda is replaced by a fake that records the device each call is given, and the
engine by one that runs nothing. The worker's logic around them is the real one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from server.jobs.contract import JobParams
from server.jobs.engine_process import Entry, Worker
from server.jobs.messages import JobDone, RunJob
from tests.helpers import encode, smooth_image, tiny_worker_config

GPU = torch.device("cuda", 1)


class FakeCuda:
    """What the worker calls of torch.cuda, each call recorded with the device it names."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.allocated_peak = 0  # the fake allocator's peak since its last reset

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Stream(FakeStream):  # a class, as torch's is (libraries use it in type annotations)
            def __init__(self, device: Any = None) -> None:
                fake.calls.append(("Stream", device))
                super().__init__(fake, "side", device)

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        for name in ("set_device", "current_stream", "stream", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.max_memory_allocated)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def set_device(self, device: Any) -> None:
        self.calls.append(("set_device", device))

    def current_stream(self, device: Any = None) -> FakeStream:
        self.calls.append(("current_stream", device))
        return FakeStream(self, "main", device)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        self.calls.append(("stream", stream.device))
        yield

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.calls.append(("reset_peak_memory_stats", device))
        self.allocated_peak = 0

    def max_memory_allocated(self, device: Any = None) -> int:
        self.calls.append(("max_memory_allocated", device))
        return self.allocated_peak

    def devices(self, *names: str) -> list[Any]:
        return [device for name, device in self.calls if name in names]


@dataclass
class FakeStream:
    cuda: FakeCuda
    name: str
    device: Any

    def record_event(self) -> str:
        self.cuda.calls.append(("record_event", self.device))
        return f"event on {self.name}"

    def wait_event(self, event: str) -> None:
        self.cuda.calls.append(("wait_event", self.device))


@dataclass
class FakeTensor:
    recorded_on: list[Any] = field(default_factory=list)

    def record_stream(self, stream: FakeStream) -> None:
        self.recorded_on.append(stream.device)

    def float(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return self


class FakeEngine:
    """Prepares, denoises and finishes nothing; each job's denoising 'allocates' its own peak."""

    device = GPU

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def prepare(self, request: Any) -> Any:
        tensors = {name: FakeTensor() for name in ("image_latents", "latent_mask", "masked_latents", "noise")}
        prompts = SimpleNamespace(
            **{n: FakeTensor() for n in ("prompt_embeds", "negative_embeds", "pooled", "negative_pooled")}
        )
        inputs = SimpleNamespace(**tensors, prompts=prompts)
        return SimpleNamespace(request=request, inputs=inputs, rows=1, batch_key=("same",))

    def denoise(self, jobs: list[Any], on_steps: Any = None, on_latents: Any = None) -> list[FakeTensor]:
        # A job's "memory" is its seed, so each answer shows whose peak it carries.
        self.cuda.allocated_peak = max(self.cuda.allocated_peak, *(job.request.seed for job in jobs))
        return [FakeTensor() for _ in jobs]

    def finish(self, job: Any, images: Any) -> Any:
        return result_of(job.request.seed)

    def run(self, request: Any, on_step: Any = None) -> Any:
        self.denoise([self.prepare(request)])
        return result_of(request.seed)


def result_of(seed: int) -> Any:
    return SimpleNamespace(
        images=[Image.new("RGB", (8, 8))], seeds=[seed], working_size=(8, 8), inference_time=0.1,
        positive_prompts=["p"], negative_prompts=[""], styles=[], notes={},
    )  # fmt: skip


class Pipe:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)


def job(job_id: str, seed: int) -> RunJob:
    return RunJob(job_id, 1, JobParams(prompt="p", seed=seed, left=8), encode(smooth_image(16, 16)))


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


@pytest.fixture
def worker(cuda: FakeCuda) -> tuple[Worker, Pipe]:
    pipe = Pipe()
    worker = Worker(pipe, tiny_worker_config())  # type: ignore[arg-type]
    worker.engine = FakeEngine(cuda)
    worker.use_device()
    return worker, pipe


def test_the_worker_takes_the_engines_device_and_its_side_stream_lives_there(
    cuda: FakeCuda, worker: tuple[Worker, Pipe]
) -> None:
    assert cuda.calls == [("set_device", GPU), ("Stream", GPU)]
    assert worker[0].max_batch == 4  # CUDA's default


def test_the_hand_over_between_streams_happens_on_the_engines_device(
    cuda: FakeCuda, worker: tuple[Worker, Pipe]
) -> None:
    w, pipe = worker
    entries = [Entry(job("a", 7_000)), Entry(job("b", 5_000))]
    for entry in entries:
        w._prepare(entry)  # on the side stream
    w._denoise(entries)
    # Every stream, event and memory call named cuda:1; a call without a device would be cuda:0's.
    names = ("Stream", "stream", "record_event", "current_stream", "wait_event", "reset_peak_memory_stats")
    assert cuda.devices(*names, "max_memory_allocated") and set(cuda.devices(*names, "max_memory_allocated")) == {GPU}
    assert [name for name, _ in cuda.calls].count("wait_event") == 2
    for entry in entries:
        inputs = entry.prepared.inputs
        tensors = [inputs.image_latents, inputs.noise, inputs.prompts.prompt_embeds, inputs.prompts.negative_pooled]
        assert all(t.recorded_on == [GPU] for t in tensors)  # the main stream of cuda:1 owns them now
    w._to_finish.put(None)
    w._finish_all()
    done = {m.job_id: m for m in pipe.sent if isinstance(m, JobDone)}
    assert set(done) == {"a", "b"}
    assert done["a"].result.gpu_peak_memory == done["b"].result.gpu_peak_memory == 7_000  # one batch, one peak


def test_peak_memory_is_each_jobs_own_not_the_lifetime_peak(cuda: FakeCuda, worker: tuple[Worker, Pipe]) -> None:
    w, pipe = worker
    for job_id, seed in (("big", 9_000), ("small", 3_000)):
        entry = Entry(job(job_id, seed))
        w._prepare(entry)
        w._denoise([entry])
    answer = w.run(job("alone", 2_000))  # the one-job path too
    peaks = {m.job_id: m.result.gpu_peak_memory for m in [*pipe.sent, answer] if isinstance(m, JobDone)}
    assert peaks == {"big": 9_000, "small": 3_000, "alone": 2_000}
    assert cuda.devices("reset_peak_memory_stats") == [GPU] * 3


def test_on_a_cpu_the_worker_makes_no_cuda_call(cuda: FakeCuda) -> None:
    pipe = Pipe()
    w = Worker(pipe, tiny_worker_config())  # type: ignore[arg-type]
    engine = FakeEngine(cuda)
    engine.device = torch.device("cpu")  # type: ignore[misc]
    w.engine = engine
    w.use_device()
    entry = Entry(job("a", 4_000))
    w._prepare(entry)
    w._denoise([entry])
    assert cuda.calls == [] and w.max_batch == 1
    assert [m.result.gpu_peak_memory for m in pipe.sent if isinstance(m, JobDone)] == [0]
