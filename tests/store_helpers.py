"""The in-process store tests run on both stores: `Stores` opens stores of one kind on one backing
(a folder for SQLite, a key prefix on a real redis-server), so a test can also "restart" its store."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import redis

from server.jobs.redis_store import RedisJobStore
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore
from tests.helpers import sqlite_files
from tests.redis_helpers import RedisServer

KINDS = ["sqlite", "redis"]


class Stores:
    def __init__(self, kind: str, folder: Path, server: RedisServer | None = None) -> None:
        self.kind, self.folder, self.server = kind, folder, server
        self.prefix = f"t{uuid.uuid4().hex[:12]}:"  # tests share a redis-server, never its keys
        self.opened: list[Any] = []

    def open(self, **options: Any) -> JobStore:
        store: Any
        if self.kind == "sqlite":
            store = SqliteJobStore(self.folder, **options)
        else:
            assert self.server is not None
            store = RedisJobStore(self.server.url, prefix=self.prefix, **options)
        self.opened.append(store)
        return store

    def stored_inputs(self) -> int:
        """How many jobs have files kept (a refused submission must leave none)."""
        if self.kind == "sqlite":
            return len(sqlite_files(self.folder))
        assert self.server is not None
        client = redis.Redis.from_url(self.server.url)
        try:
            return sum(1 for _ in client.scan_iter(f"{self.prefix}files:*"))
        finally:
            client.close()

    def close(self) -> None:
        for store in self.opened:
            if isinstance(store, RedisJobStore):
                store.close()
