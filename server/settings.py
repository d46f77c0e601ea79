"""Every setting of the server, each one a `BEYOND_*` environment variable (or a CLI option)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.names import DEFAULT_MODEL
from server.guard.hosts import check_host_patterns, check_proxy_addresses
from server.guard.ratelimit import check_rate_limit


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BEYOND_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL
    data_dir: Path = Path("./data")
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    # Absolute base for status_url / response_url / output URLs when behind a reverse proxy,
    # e.g. https://gpu.example.com/beyond. Unset: taken from each request.
    public_url: str | None = None
    # Host names this server answers, comma-separated (*.example.com: any name below it; *: any): a request
    # with another Host header gets 400. Unset: any Host, and without public_url the URLs are built from it.
    allowed_hosts: str | None = None
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed: comma-separated IP addresses or
    # networks, or *. Unset: nobody's; the headers are ignored (a client could write them).
    forwarded_allow_ips: str | None = None
    result_ttl: float = Field(3600.0, gt=0)
    # A Redis server shared by every node (docs/scaling.md), e.g. redis://127.0.0.1:6379/0,
    # redis://user:password@host:6379/0, or rediss://... for TLS. Unset: the embedded SQLite store in data_dir.
    redis_url: str | None = None
    # With rediss://: the CA bundle that signed Redis's certificate (unset: the system's CAs), and this
    # node's own certificate and key for a Redis that asks for one (mutual TLS).
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    # With Redis: a job whose worker shows no sign of life for this long is taken over by another.
    reclaim_after: float = Field(60.0, gt=0)
    purge_interval: float = Field(30.0, gt=0)

    # Comma-separated API keys; none: open access (with a warning at startup).
    api_keys: SecretStr | None = None
    # A JSON or TOML file of keys with per-key name, endpoints, rate_limit and credits (docs/guard.md).
    api_keys_file: Path | None = None
    # /metrics is open (like /health) unless this is on; then it takes a key allowed "metrics".
    metrics_require_key: bool = False
    # Bounded queue: beyond it new work gets 429 at once rather than waiting without end.
    max_queue: int = Field(100, gt=0)
    # A v1 request waiting longer than this gets 504 and its job is cancelled.
    sync_timeout: float = Field(600.0, gt=0)
    # base64 inflates a 20 MB image to about 27 MB.
    max_body_bytes: int = Field(30 * 1024 * 1024, gt=0)

    # Submissions per key (one shared bucket without keys), in limits' notation, e.g. "60/minute;10/second".
    rate_limit: str | None = None

    allow_private_urls: bool = False
    max_input_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_input_pixels: int = Field(16_000_000, gt=0)
    max_canvas_pixels: int = Field(40_000_000, gt=0)
    max_prompt_chars: int = Field(10_000, gt=0)
    fetch_timeout: float = Field(15.0, gt=0)

    # Webhooks (docs/extensions.md): the `whsec_<base64>` signing secret; without it, webhook_url is refused.
    # Checked when the app is built, not here: a pydantic error would print the value it refused.
    webhook_secret: SecretStr | None = None
    # Seconds one delivery attempt may take, connection to the receiver's answer.
    webhook_timeout: float = Field(10.0, gt=0)

    # Threads torch may use on a CPU (None: torch's default, one per core).
    cpu_threads: int | None = Field(None, gt=0)
    # Images denoised in one UNet batch, from compatible queued jobs (None: 4 on CUDA, 1 on a CPU).
    max_batch: int | None = Field(None, gt=0)
    # Keep the next jobs in the worker, decoded and prepared while one denoises (0: one at a time).
    worker_prefetch: bool = True

    # Engine speed knobs (models/speed.py): auto | 1 | 0, and 0 | 1 | a torch.compile mode.
    channels_last: Literal["auto", "1", "0"] = "auto"
    fuse_qkv: Literal["auto", "1", "0"] = "auto"
    compile: str = "0"
    # With compile: the working sizes compiled before the worker is ready, "WxH,WxH"; unset: 9 SDXL sizes.
    compile_sizes: str | None = None

    styles_dir: Path | None = None
    expansion_model: Path | None = None
    # A folder of SDXL LoRA files (*.safetensors) that requests may name in `loras`; unset: none.
    lora_dir: Path | None = None
    # Bytes of LoRA weights the engine keeps loaded (on its device), least recently used out first.
    lora_cache: int = Field(1 << 30, ge=0)

    # Seconds before restarting an engine process that died while loading the model, doubled at each such
    # death in a row (at most 60); meanwhile /health lists its worker as failed, with the error.
    worker_restart_backoff: float = Field(2.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error", "critical", "DEBUG", "INFO", "WARNING", "ERROR"] = "info"
    log_format: Literal["text", "json"] = "text"

    # Below this much free space in data_dir, submissions get 507 and /health says the disk is full.
    min_free_bytes: int = Field(50 * 1024 * 1024, ge=0)
    # Where a single-file checkpoint's tokenizers are looked for first (see the README's "Real weights").
    tokenizer_dir: Path | None = None

    # Roles (docs/scaling.md). False: `beyond serve --no-worker`, an API node with no engine of its own.
    local_worker: bool = True
    # This worker's name in the registry (beyond:workers:<name>); unset: <hostname>-<pid>.
    worker_name: str | None = None
    # How often a worker refreshes its registry card; a card not refreshed for 3 times this is gone.
    heartbeat_interval: float = Field(2.0, gt=0)
    # `beyond worker` only: serve its Prometheus metrics on this port of `host` (unset: none; it has no HTTP).
    metrics_port: int | None = Field(None, ge=1, le=65535)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps; got {value!r}")
        return value

    @field_validator("compile_sizes")
    @classmethod
    def _compile_sizes(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            sides = re.fullmatch(r"\d+x\d+(,\d+x\d+)*", value.replace(" ", ""))
            if sides is None or any(int(v) % 64 or not int(v) for v in re.findall(r"\d+", value)):
                raise ValueError("must be WxH,WxH,... with sides that are positive multiples of 64")
        return value

    @field_validator("lora_dir")
    @classmethod
    def _lora_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no such folder: {value}")
        return value

    @field_validator("worker_name")
    @classmethod
    def _worker_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("public_url", "allowed_hosts", "forwarded_allow_ips", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes a variable it was not given as an empty string.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str | None) -> str | None:
        return value if value is None else check_host_patterns(value)

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _forwarded_allow_ips(cls, value: str | None) -> str | None:
        return value if value is None else check_proxy_addresses(value)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is not None:
            check_rate_limit(value)
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
