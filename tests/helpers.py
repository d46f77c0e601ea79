"""Test helpers: a real `beyond serve` process, a loopback image server, and test pictures."""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from server.guard.images import ImageLimits
from server.jobs.messages import WorkerConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_worker_config(**fields: object) -> WorkerConfig:
    """The engine process's settings for the tiny random-weight model on the CPU."""
    return WorkerConfig(model="random:tiny", device="cpu", dtype="auto", limits=ImageLimits(), **fields)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`beyond serve` in a subprocess of its own, on a free loopback port; with role="worker", a
    `beyond worker` (no HTTP) instead. `args` are appended to the command line (e.g. --no-worker)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        model: str = "random:tiny",
        env: dict[str, str] | None = None,
        role: str = "serve",
        args: tuple[str, ...] = (),
        device: str = "cpu",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.model = model
        self.role = role
        self.args = args
        self.device = device
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BEYOND_ALLOW_PRIVATE_URLS": "1",
            "HF_HUB_OFFLINE": "1",
            "BEYOND_LOG_LEVEL": "info",
            # Two cores shared by pytest, the API and the worker: more threads only make them wait.
            "BEYOND_CPU_THREADS": "1",
            **(env or {}),
        }
        self.log_path = self.data_dir / ("server.log" if role == "serve" else f"{role}.log")
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        listen = ["--port", str(self.port)] if self.role == "serve" else []
        return [
            sys.executable, "-m", "server.commands.cli", self.role, "--model", self.model, *listen,
            "--data-dir", str(self.data_dir), "--device", self.device, *self.args,
        ]  # fmt: skip

    def start(self) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - held open for the process's lifetime
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def health(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5)
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Until /health answers 200 (a worker: until its log says its engine is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.role == "worker":
                if "worker ready" in self.log_path.read_text(errors="replace"):
                    return self
                time.sleep(0.2)
                continue
            response = self.health()
            if response is not None and response.status_code == 200:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def worker_pid(self) -> int:
        return int(httpx.get(f"{self.url}/health", timeout=5).json()["worker_pid"])

    def kill(self) -> None:
        """kill -9 of the whole process group: the API process and its worker."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        # The worker is in the same process group; make sure nothing outlives the test.
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def process_state(pid: int) -> tuple[int, str] | None:
    """A process's parent and state letter (R, S, Z...) from /proc/<pid>/stat; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ...": the command may hold spaces and parentheses, the fields after it do not.
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return int(ppid), state


def running(pid: int) -> bool:
    """The process exists and is not a zombie (dead, waiting to be reaped by its new parent)."""
    found = process_state(pid)
    return found is not None and found[1] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, found by scanning /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = process_state(int(entry.name))
            if state is not None and state[0] == pid:
                found.append(int(entry.name))
    return found


# The keys of the `server_with_keys` fixture: one for everything, and one for each refusal a key can meet.
KEYS = {
    "full": "SG_0a0a0a0a0a0a0a0a",
    "v1-only": "SG_1b1b1b1b1b1b1b1b",  # 403 on /v2
    "broke": "SG_2c2c2c2c2c2c2c2c",  # no credits: 406 on a submission
    "slow": "SG_3d3d3d3d3d3d3d3d",  # one submission an hour: 429 on the second
}


def keys_file(folder: Path) -> Path:
    entries = [
        {"key": KEYS["full"], "name": "full"},
        {"key": KEYS["v1-only"], "name": "v1-only", "endpoints": ["v1"]},
        {"key": KEYS["broke"], "name": "broke", "credits": 0},
        {"key": KEYS["slow"], "name": "slow", "rate_limit": "1/hour"},
    ]
    path = folder / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    return path


def wait_until_nothing_waits(server: ServerProcess, timeout: float = 120) -> None:
    """Until /health counts no job waiting: none queued, none handed to the worker and not started yet
    (the queue's bound counts those too)."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/health", timeout=10).json()["queued"] != 0:
        assert time.monotonic() < deadline, "jobs still waiting"
        time.sleep(0.05)


def sqlite_files(data_dir: Path) -> dict[str, set[str]]:
    """The files the embedded store in `data_dir` keeps, by job: rows of its files table (small files) and
    files in the jobs' folders (large ones)."""
    kept: dict[str, set[str]] = {}
    database = data_dir / "jobs.sqlite3"
    if database.exists():
        with contextlib.closing(sqlite3.connect(database, timeout=30)) as db:
            for job_id, name in db.execute("SELECT job_id, name FROM files"):
                kept.setdefault(job_id, set()).add(name)
    folders = data_dir / "jobs"
    for folder in folders.iterdir() if folders.is_dir() else ():
        if folder.is_dir():
            kept.setdefault(folder.name, set()).update(f.name for f in folder.iterdir() if not f.name.startswith("."))
    return kept


def drop_sqlite_files(data_dir: Path, job_id: str, prefix: str) -> int:
    """Deletes the files of a job in the embedded store whose names start with `prefix`, as a person clearing
    space by hand would; how many there were."""
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3", timeout=30)) as db, db:
        dropped = db.execute("DELETE FROM files WHERE job_id = ? AND name LIKE ?", (job_id, prefix + "%")).rowcount
    for file in (data_dir / "jobs" / job_id).glob(prefix + "*"):
        file.unlink()
        dropped += 1
    return dropped


def serve_expecting_exit(data_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `beyond serve` where it must refuse to start; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "server.commands.cli", "serve", "--model", "random:tiny", "--data-dir", str(data_dir)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


class ImageServer:
    """A loopback HTTP server for input_image URLs: path -> (status, bytes, content type). It counts the
    requests for each path (`hits`); a path added with a `gate` is answered only once the gate is set."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, str, dict[str, str]]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        routes, gates, hits, lock = self.routes, self.gates, self.hits, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                with lock:
                    hits[self.path] += 1
                gate = gates.get(self.path)
                if gate is not None:
                    gate.wait(120)
                status, body, ctype, headers = routes.get(self.path, (404, b"not found", "text/plain", {}))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetching node hung up (a test killed it)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(
        self,
        path: str,
        body: bytes,
        ctype: str = "image/png",
        status: int = 200,
        headers: dict[str, str] | None = None,
        gate: threading.Event | None = None,
    ) -> str:
        self.routes[path] = (status, body, ctype, headers or {})
        if gate is not None:
            self.gates[path] = gate
        return self.url + path

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.httpd.shutdown()


def noise_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(width: int = 96, height: int = 64) -> Image.Image:
    """A gradient: JPEG-friendly, so preserved areas can be compared closely after encoding."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 128.0),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request_body(image: Image.Image | None = None, **fields: object) -> dict:
    image = image if image is not None else smooth_image()
    return {"input_image": b64(encode(image)), "prompt": "a quiet beach", "steps": 20, "left": 32, **fields}


# Fields for a job that must still be queued or running when a test acts on it (cancels it, kills its
# worker, lets its client time out): 100 steps of a two-evaluation sampler with guidance, 6.1 s alone on the
# default canvas on a 2-core Xeon VM, where 100 one-evaluation steps take 3.2 s
# (and a faster machine had finished them inside a test's 3 s timeout).
LONG_JOB = {"steps": 100, "sampler": "heun"}


def jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.convert("RGB")


def build_tiny_gpt2(folder: Path) -> Path:
    """A GPT-2 folder for V2 expansion: byte-level BPE trained here on our word list, random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from models.expansion import load_words

    words = load_words()
    corpus = [" ".join(words[i : i + 6]) + ", a photo of a red barn in the snow." for i in range(0, len(words), 6)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # A small vocabulary: common words become one token, the rest are spelled in several.
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
