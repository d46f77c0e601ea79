"""The engine process: loads the engine once, then runs the jobs the supervisor sends.

It is a separate process so that a crash, an out-of-memory kill or a hung driver takes down only
the engine; the API stays up and the supervisor starts a new engine process. (Its class is still
named Worker, and its entry point worker_main: see server/jobs/__init__.py for the words.)

Three threads keep the denoising busy (the supervisor keeps a few jobs in flight for that):
- the preparer decodes each job as it arrives and runs the engine's `prepare` (canvas, mask, text
  embeddings, latents; on CUDA on a side stream), in arrival order;
- the main thread takes the prepared jobs in order, batches the compatible ones waiting at the
  head (up to `max_batch` images) and denoises them;
- the finisher pastes each job's images back, encodes them and sends the answer, and encodes the
  live previews, so the denoising never waits on JPEG/PNG encoding.
A job that finds the main thread idle, or that leaves nothing behind it, is prepared or finished by
the main thread itself: each hand-over between threads costs a small request a fraction of a
millisecond, and with nothing to overlap it buys nothing.

Longer than most modules, as one cohesive thing: the three threads, their hand-overs and the messages
they answer share one state (the jobs in flight, the cancels) and are read together.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from models.engine import OutpaintRequest

from server.jobs.contract import Delivery, FailureKind, JobParams, JobResult, output_name
from server.jobs.lifeline import end_with_parent, parent_gone
from server.jobs.messages import (
    Cancel,
    JobDone,
    JobFailed,
    LoadFailed,
    Preview,
    Progress,
    Ready,
    RunJob,
    Shutdown,
    Started,
    WorkerConfig,
)

log = logging.getLogger("beyond.worker")
UNKNOWN_FAILURE = "the engine failed on this request (an internal error); the server log has the details"
PREVIEW_INTERVAL = 0.5  # seconds between two previews of a job, at least
PREVIEW_SIDE = 256  # the preview's longest side, in pixels


def engine_request(image: Image.Image, params: JobParams) -> OutpaintRequest:
    """The engine's request: the job's parameters (the engine's own type) and its image."""
    from models.engine import OutpaintRequest

    return OutpaintRequest.of(image, params)


def encode(picture: Image.Image, delivery: Delivery) -> bytes:
    """An output image in the asked-for format; PNG is lossless, so kept pixels stay bit-exact."""
    buffer = io.BytesIO()
    if delivery.output_format == "png":
        picture.save(buffer, format="PNG")
    elif delivery.output_format == "webp":
        picture.save(buffer, format="WEBP", quality=delivery.output_quality)
    else:
        picture.save(buffer, format="JPEG", quality=delivery.output_quality)
    return buffer.getvalue()


def preview_jpeg(rgb: Any) -> bytes:
    """A small JPEG of a latent preview ((h, w, 3) uint8 tensor), longest side PREVIEW_SIDE."""
    picture = Image.fromarray(rgb.numpy())
    scale = PREVIEW_SIDE / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    buffer = io.BytesIO()
    picture.resize(size, Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


def failure(job: RunJob, exc: BaseException) -> JobFailed:
    """A job's failure in our words: the client never sees an exception's text unless it is ours."""
    from models.errors import Cancelled, LoraError, NonFiniteOutput
    from server.guard.images import InputImageError

    def failed(error: str, kind: FailureKind) -> JobFailed:
        return JobFailed(job.job_id, job.attempt, error, kind.value)

    if isinstance(exc, Cancelled):
        return failed("cancelled", FailureKind.CANCELLED)
    if isinstance(exc, InputImageError):
        return failed(str(exc), FailureKind.INPUT)
    if isinstance(exc, LoraError):  # a LoRA that was usable at submission and is not now (its file changed)
        return failed(f"loras: {exc}", FailureKind.INPUT)
    if isinstance(exc, MemoryError):
        log.warning("job %s: %s (%s)", job.job_id, exc, getattr(exc, "detail", ""))
        return failed("out of memory; try fewer samples or a smaller canvas", FailureKind.OUT_OF_MEMORY)
    if isinstance(exc, FloatingPointError):
        log.warning("job %s: %s", job.job_id, exc)
        dtype = exc.dtype if isinstance(exc, NonFiniteOutput) else "this precision"
        return failed(
            f"the model produced NaN or infinite values in {dtype}; another seed may help, or the server"
            " in bf16 or fp32 (BEYOND_DTYPE)",
            FailureKind.NON_FINITE,
        )
    log.error("job %s failed", job.job_id, exc_info=exc)
    return failed(UNKNOWN_FAILURE, FailureKind.ENGINE)


@dataclass
class Entry:
    """A job in the engine process: received, then prepared (or failed), then in a batch, then answered."""

    job: RunJob
    ready: threading.Event = field(default_factory=threading.Event)
    prepared: Any = None  # models.engine.PreparedJob
    error: BaseException | None = None  # its preparation failed
    stream_event: Any = None  # CUDA: the side stream's work on it is done past this event
    peak_memory: int = 0  # CUDA: the most the device held while its batch was denoised and decoded
    answered: bool = False
    inline: bool = False  # prepared by the main thread (it was idle when the job came), not the preparer

    @property
    def job_id(self) -> str:
        return self.job.job_id


class Worker:
    """The engine process's state and threads (the class is named for what it was called before)."""

    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        self.cancelled: set[str] = set()
        self.engine = None
        self.max_batch = config.max_batch or 1
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._entries: deque[Entry] = deque()  # received and not yet taken into a batch, in order
        self._to_prepare: queue.Queue[Entry | None] = queue.Queue()
        self._to_finish: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._shutdown = False
        self._cuda_device: Any = None  # the engine's torch.device when it is a CUDA one
        self._side_stream: Any = None
        self._outbox: queue.Queue[object | None] = queue.Queue()
        self._sending = False
        self._idle = False  # the main thread waits for a job, with none received

    def send(self, message: object, direct: bool = False) -> None:
        """Queued for the sender thread once serving, so a big answer in the pipe never stalls a step;
        `direct` (nothing runs that it could stall) writes it now when nothing is queued ahead of it."""
        if self._sending and not (direct and self._outbox.empty()):
            self._outbox.put(message)
            return
        with self._send_lock:
            self.conn.send(message)

    def _send_all(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                with self._send_lock:
                    self.conn.send(message)
            except (OSError, ValueError):  # the supervisor is gone: this process ends soon
                return

    def load(self) -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from models.composer import build_composer
        from models.engine import OutpaintEngine
        from models.speed import SpeedOptions

        # The libraries print through handlers of their own; through ours they keep the one format.
        for library in (diffusers_logging, transformers_logging):
            library.disable_default_handler()
            library.enable_propagation()
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        config = self.config
        speed = SpeedOptions.parse(config.channels_last, config.fuse_qkv, config.compile, config.compile_sizes)
        engine = OutpaintEngine.load(
            config.model, config.device, config.dtype, speed, tokenizer_dir=config.tokenizer_dir
        )
        engine.composer = build_composer(config.styles_dir, config.expansion_model, device=engine.device)
        engine.enable_loras(config.lora_dir, config.lora_cache)
        self.engine = engine
        self.use_device()
        # A compiled UNet is compiled for every working size now, before the worker reports ready:
        # no request waits for a compile.
        seconds = engine.pipeline.warm_up()
        if seconds:
            log.info("UNet compiled for %d working sizes in %.0f s", len(seconds), sum(seconds.values()))

    def use_device(self) -> None:
        """Every CUDA call of this worker goes to the engine's own device (cuda:N with one worker per GPU)."""
        cuda = self.engine.device.type == "cuda"
        self.max_batch = self.config.max_batch or (4 if cuda else 1)
        if cuda:
            import torch

            self._cuda_device = self.engine.device
            # Also for what names no device (a library's own CUDA calls, torch's current-device defaults).
            torch.cuda.set_device(self._cuda_device)
            self._side_stream = torch.cuda.Stream(self._cuda_device)

    # -- the reader: the pipe, all the time (cancels must arrive while a batch runs) --------------

    def listen(self) -> None:
        """The reader, from start-up to the end (loading and shutting down included): the pipe's EOF means
        the API process died, and ends this one (server/jobs/lifeline.py)."""
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                parent_gone()
            with self._arrived:
                if isinstance(message, Cancel):
                    self.cancelled.add(message.job_id)
                elif isinstance(message, RunJob):
                    entry = Entry(message, inline=self._idle)
                    self._entries.append(entry)
                    if not entry.inline:
                        self._to_prepare.put(entry)
                elif isinstance(message, Shutdown):
                    self._shutdown = True
                self._arrived.notify_all()

    # -- the preparer --------------------------------------------------------------------------

    def _prepare_all(self) -> None:
        while (entry := self._to_prepare.get()) is not None:
            self._prepare_entry(entry)

    def _prepare_entry(self, entry: Entry) -> None:
        try:
            self._prepare(entry)
        except Exception as exc:  # answered as the job's failure, in our words
            entry.error = exc
        finally:
            entry.ready.set()

    def _prepare(self, entry: Entry) -> None:
        from models.errors import Cancelled
        from server.guard.images import check_canvas, decode_image

        job = entry.job
        if job.job_id in self.cancelled:
            raise Cancelled()
        image = decode_image(job.image, self.config.limits)
        check_canvas(job.params.canvas_size(*image.size), self.config.limits)
        with self._on_side_stream():
            entry.prepared = self.engine.prepare(engine_request(image, job.params))
            if self._side_stream is not None:
                entry.stream_event = self._side_stream.record_event()

    @contextlib.contextmanager
    def _on_side_stream(self) -> Iterator[None]:
        if self._side_stream is None:
            yield
            return
        import torch

        with torch.cuda.stream(self._side_stream):
            yield

    def _hand_over(self, entry: Entry) -> None:
        """CUDA: the main stream waits for the side stream's work on `entry`, and owns its tensors."""
        if entry.stream_event is None or entry.prepared.inputs is None:
            return
        import torch

        main = torch.cuda.current_stream(self._cuda_device)
        main.wait_event(entry.stream_event)
        inputs = entry.prepared.inputs
        prompts = inputs.prompts
        tensors = [inputs.image_latents, inputs.latent_mask, inputs.masked_latents, inputs.noise]
        tensors += [prompts.prompt_embeds, prompts.negative_embeds, prompts.pooled, prompts.negative_pooled]
        for tensor in tensors:
            if tensor is not None:
                # Made on the side stream: its memory must not be reused before the main stream is done.
                tensor.record_stream(main)

    # -- the finisher --------------------------------------------------------------------------

    def _finish_all(self) -> None:
        while (task := self._to_finish.get()) is not None:
            try:
                task()
            except Exception:  # one answer's failure must not end the finisher
                log.exception("finishing a job failed")
            finally:
                self._to_finish.task_done()

    def _answer(self, entry: Entry, message: JobDone | JobFailed, direct: bool = False) -> None:
        with self._lock:
            if entry.answered:
                return
            entry.answered = True
            self.cancelled.discard(entry.job_id)
        self.send(message, direct)

    def _finish(self, entry: Entry, images: Any, direct: bool = False) -> None:
        try:
            result = self.engine.finish(entry.prepared, images)
            self._answer(entry, self._done(entry.job, result, entry.peak_memory), direct)
        except Exception as exc:
            self._answer(entry, failure(entry.job, exc), direct)

    def _reset_peak_memory(self) -> None:
        if self._cuda_device is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self._cuda_device)

    def _peak_memory(self) -> int:
        """The most the engine's device held since the last reset (0 on a CPU)."""
        if self._cuda_device is None:
            return 0
        import torch

        return int(torch.cuda.max_memory_allocated(self._cuda_device))

    def _done(self, job: RunJob, result: Any, peak_memory: int) -> JobDone:
        extension = job.delivery.extension
        files = {output_name(i, extension): encode(p, job.delivery) for i, p in enumerate(result.images)}
        return JobDone(
            job.job_id,
            job.attempt,
            JobResult(
                outputs=tuple(files),
                seeds=tuple(result.seeds),
                width=result.images[0].width,
                height=result.images[0].height,
                working_size=tuple(result.working_size),
                inference_time=result.inference_time,
                positive_prompts=tuple(result.positive_prompts),
                negative_prompts=tuple(result.negative_prompts),
                styles=tuple(result.styles),
                notes=result.notes,
                gpu_peak_memory=peak_memory,
            ),
            files,
        )

    # -- the main thread: batches in order ------------------------------------------------------

    def serve(self) -> None:
        sender = threading.Thread(target=self._send_all, name="worker-send", daemon=True)
        finisher = threading.Thread(target=self._finish_all, name="worker-finish", daemon=True)
        threads = [
            threading.Thread(target=self._prepare_all, name="worker-prepare", daemon=True),
            finisher,
            sender,
        ]
        self._sending = True
        for thread in threads:
            thread.start()
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._denoise(batch)
        finally:
            # Answers already made still go out.
            self._to_prepare.put(None)
            self._to_finish.put(None)
            finisher.join(5.0)
            self._outbox.put(None)
            sender.join(5.0)

    def _next_batch(self) -> list[Entry] | None:
        """The jobs to denoise next: the head of the line and the compatible ones right behind it.

        Only jobs already here join (their preparation is waited for: it is short, and they are
        next in line anyway); a job is never held back for a partner. None: shut down.
        """
        with self._arrived:
            while not self._entries and not self._shutdown:
                self._idle = True
                self._arrived.wait()
            self._idle = False
            if self._shutdown:
                return None
        batch: list[Entry] = []
        rows = 0
        while rows < self.max_batch:
            with self._lock:
                if not self._entries:
                    break
                entry = self._entries[0]
            if entry.inline and not entry.ready.is_set():
                self._prepare_entry(entry)
            entry.ready.wait()
            if entry.error is not None or entry.job_id in self.cancelled:
                from models.errors import Cancelled

                with self._lock:
                    self._entries.popleft()
                self._answer(entry, failure(entry.job, entry.error or Cancelled()))
                continue
            key = entry.prepared.batch_key
            fits = rows + entry.prepared.rows <= self.max_batch
            if batch and (key is None or key != batch[0].prepared.batch_key or not fits):
                break
            with self._lock:
                self._entries.popleft()
            batch.append(entry)
            rows += entry.prepared.rows
            if key is None:
                break
        return batch

    def _denoise(self, batch: list[Entry]) -> None:
        from models.errors import Cancelled

        def on_step_of(entry: Entry) -> Callable[[int, int], None]:
            def on_step(step: int, total: int) -> None:
                if entry.job_id in self.cancelled:
                    # Answered at once; its rows may go on being computed with its partners'.
                    self._answer(entry, failure(entry.job, Cancelled()))
                    raise Cancelled()
                self.send(Progress(entry.job_id, entry.job.attempt, step, total))

            return on_step

        last_preview = -PREVIEW_INTERVAL

        def on_latents(latents: Any) -> None:
            nonlocal last_preview
            now = time.monotonic()
            if now - last_preview < PREVIEW_INTERVAL:
                return
            last_preview = now
            self._previews(batch, latents)

        if len(batch) > 1:
            log.info("denoising %d jobs in one batch: %s", len(batch), " ".join(e.job_id for e in batch))
        for entry in batch:
            self._hand_over(entry)
            self.send(Started(entry.job_id, entry.job.attempt))
        # Per batch: the peak of its denoising and decoding (a job prepared meanwhile counts too).
        self._reset_peak_memory()
        try:
            images = self.engine.denoise([e.prepared for e in batch], [on_step_of(e) for e in batch], on_latents)
        except Cancelled:
            for entry in batch:
                self._answer(entry, failure(entry.job, Cancelled()))
            return
        except Exception as exc:  # every job of the batch gets the failure, in our words
            for entry in batch:
                self._answer(entry, failure(entry.job, exc))
            return
        peak = self._peak_memory()
        for entry, part in zip(batch, images, strict=True):
            entry.peak_memory = peak
            if entry.answered or (part is None and entry.prepared.inputs is not None):
                continue
            # The copy off the device here, once the batch is done; the rest is the finisher's, unless
            # nothing waits to be denoised or finished: then it is done here and now.
            part = part.float().cpu() if part is not None else None
            with self._lock:
                alone = not self._entries and self._to_finish.unfinished_tasks == 0
            if alone:
                self._finish(entry, part, direct=True)
            else:
                self._to_finish.put(lambda entry=entry, part=part: self._finish(entry, part))

    def _previews(self, batch: list[Entry], latents: Any) -> None:
        from models.preview import latent_rgb

        row = 0
        for entry in batch:
            rows = entry.prepared.rows
            if not entry.answered:
                rgb, job = latent_rgb(latents[row]), entry.job
                self._to_finish.put(lambda job=job, rgb=rgb: self._send_preview(job, rgb))
            row += rows

    def _send_preview(self, job: RunJob, rgb: Any) -> None:
        if job.job_id not in self.cancelled:
            self.send(Preview(job.job_id, job.attempt, preview_jpeg(rgb)))

    def run(self, job: RunJob) -> JobDone | JobFailed:
        """One job alone, start to end, in the calling thread (the engine's plain `run`)."""
        from models.errors import Cancelled
        from server.guard.images import check_canvas, decode_image

        def on_step(step: int, total: int) -> None:
            if job.job_id in self.cancelled:
                raise Cancelled()
            self.send(Progress(job.job_id, job.attempt, step, total))

        try:
            if job.job_id in self.cancelled:
                raise Cancelled()
            image = decode_image(job.image, self.config.limits)
            check_canvas(job.params.canvas_size(*image.size), self.config.limits)
            self.send(Started(job.job_id, job.attempt))
            self._reset_peak_memory()
            result = self.engine.run(engine_request(image, job.params), on_step)
            return self._done(job, result, self._peak_memory())
        except Exception as exc:  # one job's failure must not end the worker; the client gets our words only
            return failure(job, exc)
        finally:
            self.cancelled.discard(job.job_id)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    from server.logs import configure

    configure(config.log_level, config.log_format)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        end_with_parent(parent.pid)
    # A job passes between this process's threads (reader, preparer, denoiser, finisher, sender); with
    # Python's default 5 ms switch interval each hand-over can wait that long for the GIL.
    sys.setswitchinterval(0.0005)
    worker = Worker(conn, config)
    worker.listen()
    try:
        worker.load()
    except Exception as exc:
        log.exception("could not load the model")
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(worker.engine.describe(), worker.max_batch))
    worker.serve()
