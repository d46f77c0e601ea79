"""The worker process: loads the engine once, then runs one job at a time for the supervisor.

It is a separate process so that a crash, an out-of-memory kill or a hung driver takes down only
the engine; the API stays up and the supervisor starts a new worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from multiprocessing.connection import Connection

from server.jobs.messages import (
    Cancel,
    JobDone,
    JobFailed,
    LoadFailed,
    Progress,
    Ready,
    RunJob,
    Shutdown,
    WorkerConfig,
)
from server.jobs.model import FailureKind

log = logging.getLogger("beyond.worker")
JPEG_QUALITY = 95


def output_name(index: int) -> str:
    return f"output-{index}.jpg"


class Worker:
    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: set[str] = set()
        self.engine = None

    def load(self) -> None:
        import torch

        from models.composer import build_composer
        from models.engine import OutpaintEngine
        from models.speed import SpeedOptions

        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        config = self.config
        speed = SpeedOptions.parse(config.channels_last, config.fuse_qkv, config.compile)
        engine = OutpaintEngine.load(config.model, config.device, config.dtype, speed)
        engine.composer = build_composer(self.config.styles_dir, self.config.expansion_model, device=engine.device)
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
                self.conn.send(self.run(message))

    def run(self, job: RunJob) -> JobDone | JobFailed:
        import torch

        from models.engine import Cancelled, OutpaintRequest
        from server.images import InputImageError, check_canvas, decode_image, load_image

        def on_step(step: int, total: int) -> None:
            if job.job_id in self.cancelled:
                raise Cancelled()
            self.conn.send(Progress(job.job_id, step, total))

        try:
            if job.source.get("kind") == "url":
                image = load_image(job.source["url"], self.config.limits)
            else:
                image = decode_image((job.folder / "input").read_bytes(), self.config.limits)
            check_canvas(image.size, job.params, self.config.limits)
            result = self.engine.run(OutpaintRequest(image=image, **job.params), on_step)
            for i, picture in enumerate(result.images):
                picture.save(job.folder / output_name(i), format="JPEG", quality=JPEG_QUALITY)
            return JobDone(
                job.job_id,
                {
                    "outputs": [output_name(i) for i in range(len(result.images))],
                    "seeds": result.seeds,
                    "width": result.images[0].width,
                    "height": result.images[0].height,
                    "working_size": list(result.working_size),
                    "inference_time": result.inference_time,
                    "positive_prompts": result.positive_prompts,
                    "negative_prompts": result.negative_prompts,
                    "styles": result.styles,
                    "notes": result.notes,
                    "gpu_peak_memory": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                },
            )
        except Cancelled:
            return JobFailed(job.job_id, "cancelled", FailureKind.CANCELLED.value)
        except InputImageError as exc:
            return JobFailed(job.job_id, str(exc), FailureKind.INPUT.value)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return JobFailed(
                job.job_id,
                "out of GPU memory; try fewer samples or a smaller canvas",
                FailureKind.ENGINE.value,
            )
        except Exception as exc:  # one job's failure must not end the worker
            log.exception("job %s failed", job.job_id)
            return JobFailed(job.job_id, f"{type(exc).__name__}: {exc}", FailureKind.ENGINE.value)
        finally:
            self.cancelled.discard(job.job_id)


def worker_main(conn: Connection, config: WorkerConfig, log_level: str = "INFO") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s worker %(message)s")
    worker = Worker(conn, config)
    try:
        worker.load()
    except Exception as exc:
        log.exception("could not load the model")
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(worker.engine.describe()))
    worker.serve()
