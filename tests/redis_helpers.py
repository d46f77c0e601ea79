"""A real `redis-server` for the tests: its own process on a free loopback port, append-only file on.

Each test or module starts its own (`RedisServer(tmp_path).start()`), so no state leaks between them.
`kill()` is a `kill -9`; `restart()` starts it again on the same port from the same append-only file,
which is how the tests show that a Redis restart loses no accepted job.

A server can also be secured as people run it: a password on the default user (`password`), ACL users
(`users`), and a TLS port beside the plain one (`tls`, certificates from `TestCA`, made by the test).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass(frozen=True)
class TestCA:
    """A certificate authority made for one test run, and what it signed: a server certificate for `hosts`
    (127.0.0.1 and localhost by default), and a client certificate (mutual TLS). PEM files in `dir`."""

    __test__ = False  # not a test class, despite its name

    dir: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "beyond test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip

        def issue(name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[Path, Path]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            )
            if san:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            return cert_path, key_path

        ca_file = directory / "ca.crt"
        ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        server_cert, server_key = issue("server", ExtendedKeyUsageOID.SERVER_AUTH, names)
        client_cert, client_key = issue("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
        return cls(directory, ca_file, server_cert, server_key, client_cert, client_key)


class RedisServer:
    """`password`: requirepass (the default user's password). `users`: ACL rules, one user each, e.g.
    "alice on >secret ~* &* +@all". `tls`: a TLS port (`tls_port`, `tls_url`) beside the plain one;
    `client_certs`: "no", "optional" or "yes" (mutual TLS)."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        users: tuple[str, ...] = (),
        tls: TestCA | None = None,
        client_certs: str = "no",
    ) -> None:
        self.dir = Path(directory)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password
        self.users = users
        self.tls = tls
        self.client_certs = client_certs
        self.tls_port = free_port() if tls else None
        self.tls_url = f"rediss://127.0.0.1:{self.tls_port}/0" if tls else None
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def security_args(self) -> list[str]:
        args = ["--requirepass", self.password] if self.password is not None else []
        for user in self.users:
            args += ["--user", *user.split()]
        if self.tls is not None:
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", self.client_certs,
            ]  # fmt: skip
        return args

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", str(self.dir),
                "--appendonly", "yes",
                # Every write reaches the file before the reply: a kill -9 of Redis loses nothing accepted.
                "--appendfsync", "always",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                "--daemonize", "no",
                "--logfile", str(self.log_path),
                *self.security_args(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server not ready after {timeout}s:\n{self.log_tail()}")

    def ping(self) -> bool:
        """True when the server answers PING (a raw RESP exchange: no client library needed), on its TLS port
        too when it has one. A server with a password answers NOAUTH: it is up all the same."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if not s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return False
            if self.tls is None:
                return True
            context = ssl.create_default_context(cafile=str(self.tls.ca_file))
            if self.client_certs != "no":
                context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
            with (
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
            ):
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """kill -9: no shutdown save, nothing but what the append-only file already holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def restart(self, timeout: float = 20.0) -> RedisServer:
        """Start again on the same port and directory, reloading the append-only file."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory).start()
    try:
        yield server
    finally:
        server.stop()
