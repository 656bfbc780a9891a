"""A platform's services on 127.0.0.1, for end-to-end tests: a Ray head with token
authentication, an MLflow tracking server (sqlite store, proxied artifacts) and an
S3-compatible object store.

Each service is a context manager that tears it down on exit, also when the body
raises. Ray and MLflow run as child processes in their own sessions, so teardown
signals exactly the processes they started; nothing is bound beyond the loopback
interface, and the Ray head keeps its state in its own temporary directory, out of
sight of other Ray instances on the machine. Linux only: process sessions and listening
sockets are read from /proc.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
"""The virtual environment running the tests; services and Ray jobs run its executables."""

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 4000

RAY_HEAD_SETTINGS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
"""Ray's single-machine mode (its default on macOS and Windows), so every Ray server listens
on 127.0.0.1 (otherwise Ray swaps a loopback --node-ip-address for the machine's address
and its GCS listens on all interfaces); no memory monitor, which judges the whole
machine and would kill this head's workers when other processes fill the memory (the
kernel's OOM killer still guards the machine); and a stop (SIGTERM to ``ray start --block``)
that tears the node down at once instead of first draining it for up to 30 s (for Ray Serve)."""

SERVICE_PORTS = (20000, 32768)
_handed_out: set[int] = set()

TCP_LISTEN = "0A"
"""The state column of a listening socket in /proc/net/tcp."""

ISOLATED_PREFIXES = ("RAY_", "MLFLOW_", "AWS_")
"""Variables of the calling shell that must not reach the services: they get them explicitly."""


def free_port() -> int:
    """A loopback TCP port that nothing listens on, never handed out before by this process.

    Drawn from below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999), so neither outgoing connections nor Ray's own port choices take it
    between this call and the service binding it.
    """
    while True:
        port = random.randrange(*SERVICE_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def service_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment with the virtual env first on PATH and no Ray, MLflow or AWS settings."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith(ISOLATED_PREFIXES)}
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    environ.pop("PYTHONHOME", None)
    return {**environ, **(extra or {})}


def log_tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-LOG_TAIL_CHARS:]


def http_get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """Status and body of a GET request; HTTP error statuses are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_serving(
    url: str, process: subprocess.Popen[bytes], log: Path, headers: Mapping[str, str] | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail early, with the log tail, if ``process`` exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last_answer = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log_tail(log)}")
        try:
            status, body = http_get(url, headers, timeout=5.0)
        except OSError as error:
            last_answer = str(error)
        else:
            if status == 200:
                return
            last_answer = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.5)
    raise TimeoutError(f"{url} not serving after {START_TIMEOUT_S:.0f} s ({last_answer}):\n{log_tail(log)}")


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every live (not zombie) process, read from Linux's /proc."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, _group, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):
            continue
        if state != "Z":
            table.append((int(stat.parent.name), int(parent), int(session)))
    return table


def session_members(session_id: int) -> list[int]:
    """Live processes of the session ``session_id``.

    Ray's workers put themselves in process groups of their own, so a session, not a
    process group, is what holds everything a service started.
    """
    return [pid for pid, _parent, session in _process_table() if session == session_id]


def process_trees(roots: Iterable[int]) -> set[int]:
    """The live processes among ``roots`` and every live descendant of them."""
    children: dict[int, list[int]] = {}
    for pid, parent, _session in _process_table():
        children.setdefault(parent, []).append(pid)
    live = {pid for pids in children.values() for pid in pids}
    found: set[int] = set()
    pending = [root for root in roots if root in live]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending += children.get(pid, [])
    return found


def session_alive(process: subprocess.Popen[bytes]) -> bool:
    """Whether any process of the session ``process`` leads is still running."""
    process.poll()
    return bool(session_members(process.pid))


def listening_addresses(process: subprocess.Popen[bytes]) -> set[str]:
    """The IP addresses that processes of the session led by ``process`` accept TCP connections on."""
    return addresses_listened_on(session_members(process.pid))


def addresses_listened_on(pids: Iterable[int]) -> set[str]:
    """The IP addresses that the processes ``pids`` accept TCP connections on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN and fields[9] in inodes:
                addresses.add(_kernel_address(fields[1].rsplit(":", 1)[0]))
    return addresses


def _kernel_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host order), IPv4-mapped IPv6 as IPv4."""
    raw = bytes.fromhex(hex_address)
    step = -1 if sys.byteorder == "little" else 1
    words = b"".join(raw[index : index + 4][::step] for index in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def stop_session(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM every process of the session ``process`` leads, then SIGKILL what outlives the grace time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while session_alive(process) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_alive(process):
            break
    process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def session_process(command: list[str], log: Path, environ: Mapping[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` in a new session, output to ``log``; stop the whole session on exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=dict(environ), start_new_session=True
        )
    try:
        yield process
    finally:
        stop_session(process)


@dataclass(frozen=True)
class RayHead:
    """A running Ray head and what a client needs to reach it."""

    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: Path
    process: subprocess.Popen[bytes]

    def client_environment(self) -> dict[str, str]:
        """Environment for Ray CLI clients (``ray job submit`` ...): token auth and this cluster."""
        return service_environment(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.dashboard_url}
        )

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def ray_head(
    log_dir: Path, token: str, num_cpus: int = 2, node_environment: Mapping[str, str] | None = None
) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with token auth and every port chosen free.

    The temporary directory is short (Unix socket paths are limited to ~100 bytes) and
    private to this head, so ``ray.init()`` elsewhere on the machine never finds it.
    ``node_environment`` is what the node's own environment adds (credentials, as an
    instance profile or a Kubernetes Secret gives them): every job and worker inherits it.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={HOST}", f"--port={gcs_port}",
        "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={512 * 2**20}",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]  # fmt: skip
    environ = service_environment(
        # RAY_ADDRESS: Ray processes that look the cluster up (Ray Train's placement-group
        # cleaner, for one) find this head even when other Ray instances run on the machine.
        {
            **(node_environment or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_ADDRESS": f"{HOST}:{gcs_port}",
            **RAY_HEAD_SETTINGS,
        }
    )
    log = log_dir / "ray-head.log"
    try:
        with session_process(command, log, environ) as process:
            head = RayHead(f"{HOST}:{gcs_port}", f"http://{HOST}:{dashboard_port}", token, temp_dir, process)
            wait_until_serving(f"{head.dashboard_url}/api/jobs/", process, log, head.auth_header())
            yield head
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    """A running ``mlflow server`` and where it keeps runs and artifacts (all under ``root``)."""

    root: Path
    url: str
    backend_store_uri: str
    artifacts_dir: Path
    process: subprocess.Popen[bytes]


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1: sqlite backend, artifacts proxied into ``root/artifacts``; on ``port``
    (a server started again on the same store and port carries on), else on a free one."""
    port = port or free_port()
    backend_store_uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts_dir = root / "artifacts"
    command = [
        str(VENV_BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_dir),
    ]  # fmt: skip
    environ = service_environment({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    log = root / "mlflow-server.log"
    with session_process(command, log, environ) as process:
        server = MlflowServer(root, f"http://{HOST}:{port}", backend_store_uri, artifacts_dir, process)
        wait_until_serving(f"{server.url}/health", process, log)
        yield server


def dummy_credential(kind: str) -> str:
    """A credential no file holds before a test runs (not even this source), so finding it names a leak."""
    return f"cromss-e2e-{kind}-{secrets.token_hex(8)}"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and credentials it accepts (it checks none)."""

    endpoint_url: str
    access_key_id: str = field(default_factory=lambda: dummy_credential("key"))
    secret_access_key: str = field(default_factory=lambda: dummy_credential("secret"))
    session_token: str = field(default_factory=lambda: dummy_credential("session"))
    region: str = "us-east-1"

    def client(self) -> BaseClient:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            region_name=self.region,
        )

    def credentials(self) -> dict[str, str]:
        """The standard AWS variables a job needs to read from this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_DEFAULT_REGION": self.region,
        }


@contextmanager
def s3_server(port: int = 0) -> Iterator[S3Server]:
    """moto's standalone S3 server on 127.0.0.1, on ``port`` or one the OS picks. Its objects live in
    this process, so a server started again on the same port serves them again."""
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()


def upload_tree(s3: S3Server, local_dir: Path, bucket: str, prefix: str) -> list[str]:
    """Create ``bucket`` and copy every file under ``local_dir`` to ``prefix/<relative path>``."""
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def files_holding(texts: Iterable[str], *roots: Path) -> dict[str, list[str]]:
    """Each of ``texts`` found in a regular file under ``roots`` (read as bytes), with those files."""
    wanted = {text: text.encode() for text in texts}
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            content = path.read_bytes()
            for text, needle in wanted.items():
                if needle in content:
                    found.setdefault(text, []).append(str(path))
    return found
