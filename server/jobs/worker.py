"""The worker process: loads the engine once, then runs the jobs the supervisor sends, one at a time.

It is a separate process so that a crash, an out-of-memory kill or a hung driver takes down only
the engine; the API stays up and the supervisor starts a new worker.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from multiprocessing.connection import Connection

from PIL import Image

from server.jobs.contract import Delivery, FailureKind, JobResult, output_name
from server.jobs.messages import (
    Cancel,
    JobDone,
    JobFailed,
    LoadFailed,
    Progress,
    Ready,
    RunJob,
    Shutdown,
    Started,
    WorkerConfig,
)

log = logging.getLogger("beyond.worker")
UNKNOWN_FAILURE = "the engine failed on this request (an internal error); the server log has the details"


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


class Worker:
    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        self.engine = None
        self._send_lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._send_lock:
            self.conn.send(message)

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
        speed = SpeedOptions.parse(config.channels_last, config.fuse_qkv, config.compile)
        engine = OutpaintEngine.load(
            config.model, config.device, config.dtype, speed, tokenizer_dir=config.tokenizer_dir
        )
        engine.composer = build_composer(config.styles_dir, config.expansion_model, device=engine.device)
        self.engine = engine

    def _read(self) -> None:
        # Cancels must arrive while a job runs, so a thread reads the pipe all the time.
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.inbox.put(Shutdown())
                return
            if isinstance(message, Cancel):
                self.cancelled.add(message.job_id)
            else:
                self.inbox.put(message)
            if isinstance(message, Shutdown):
                return

    def serve(self) -> None:
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()
        while True:
            message = self.inbox.get()
            if isinstance(message, Shutdown):
                return
            if isinstance(message, RunJob):
                self.send(self.run(message))

    def run(self, job: RunJob) -> JobDone | JobFailed:
        import torch

        from models.engine import OutpaintRequest
        from models.errors import Cancelled, NonFiniteOutput, OutOfMemory
        from server.images import InputImageError, check_canvas, decode_image

        def failed(error: str, kind: FailureKind) -> JobFailed:
            return JobFailed(job.job_id, job.attempt, error, kind.value)

        def on_step(step: int, total: int) -> None:
            if job.job_id in self.cancelled:
                raise Cancelled()
            self.send(Progress(job.job_id, job.attempt, step, total))

        try:
            if job.job_id in self.cancelled:
                raise Cancelled()
            params = job.params.to_json()
            image = decode_image(job.image, self.config.limits)
            check_canvas(image.size, params, self.config.limits)
            self.send(Started(job.job_id, job.attempt))
            result = self.engine.run(OutpaintRequest(image=image, **params), on_step)
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
                    gpu_peak_memory=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                ),
                files,
            )
        except Cancelled:
            return failed("cancelled", FailureKind.CANCELLED)
        except InputImageError as exc:
            return failed(str(exc), FailureKind.INPUT)
        except OutOfMemory as exc:
            log.warning("job %s: %s (%s)", job.job_id, exc, exc.detail)
            return failed("out of memory; try fewer samples or a smaller canvas", FailureKind.OUT_OF_MEMORY)
        except NonFiniteOutput as exc:
            log.warning("job %s: %s", job.job_id, exc)
            return failed(
                f"the model produced NaN or infinite values in {exc.dtype}; another seed may help, or the server"
                " in bf16 or fp32 (BEYOND_DTYPE)",
                FailureKind.NON_FINITE,
            )
        except Exception:  # one job's failure must not end the worker; the client gets our words only
            log.exception("job %s failed", job.job_id)
            return failed(UNKNOWN_FAILURE, FailureKind.ENGINE)
        finally:
            self.cancelled.discard(job.job_id)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    from server.logs import configure

    configure(config.log_level, config.log_format)
    worker = Worker(conn, config)
    try:
        worker.load()
    except Exception as exc:
        log.exception("could not load the model")
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(worker.engine.describe()))
    worker.serve()
