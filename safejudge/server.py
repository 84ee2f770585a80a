"""Launches the Triton 2.51 server shipped in the nvidia-pytriton wheel, on CPU, as a child process.

The recipe and its traps are in docs/triton-on-cpu.md: the Python-backend stub must be a copy for this
interpreter's X.Y, it needs libpython and the wheel's bundled libraries on LD_LIBRARY_PATH and the venv first
on PATH, a stub that cannot load makes the server hang forever (hence `ldd` before starting and a readiness
deadline), and a killed server leaves /dev/shm regions behind (hence a unique prefix, removed after stop).

`TritonServer` runs any model repository whose config.pbtxt files may hold `${name}` placeholders;
`ServeSettings.server()` builds the one for safejudge's own `model_repository/`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

from pydantic import BaseModel, ConfigDict, Field, FilePath, model_validator

from safejudge.backends.registry import ModelSpec, served_threads
from safejudge.pipeline import (
    CREDENTIAL_HEADERS,
    PROBE_REQUEST_PREFIX,
    JudgeStageSettings,
    RequestLimits,
    token_digest,
)
from safejudge.shipped import CONSTITUTIONS, MODEL_REPOSITORY
from safejudge.store import default_cache_dir

logger = logging.getLogger(__name__)

SHM = Path("/dev/shm")
STUB_NAME = "triton_python_backend_stub"
# The model-repository API (load, unload) is reserved to the launcher's supervisor: requests need this header.
ADMIN_HEADER = "safejudge-admin"
# Protocols a token guards; health (probes) and metadata stay open.
TOKEN_PROTOCOLS = "inference,model-config,statistics,shared-memory,trace,logging"
# On gRPC, Triton's restriction checks only its own header (triton-grpc-protocol-authorization), not the
# standard `authorization` that gRPC call credentials and service meshes send; with `models_check_token` the
# models check inference themselves, from the credential headers forwarded to them.
GRPC_TOKEN_PROTOCOLS_MODELS_CHECK = TOKEN_PROTOCOLS.removeprefix("inference,")


class ServerError(RuntimeError):
    """The server could not be found, prepared, started or made ready; the message says why."""


# Where NVIDIA's containers (tritonserver:<yy.mm>-py3, -trtllm-python-py3) keep their own Triton.
CONTAINER_TRITON_HOME = Path("/opt/tritonserver")


@dataclass(frozen=True)
class TritonInstall:
    """One Triton installation: the server binary, its Python backend, the backend stub for this interpreter
    and the shared libraries they need. `find_triton` chooses one."""

    binary: Path
    python_backend: Path
    stub: Path
    library_dirs: tuple[Path, ...]
    origin: str

    @classmethod
    def from_wheel(cls) -> TritonInstall:
        """The Triton 2.51 inside the nvidia-pytriton wheel (CPU machines; its stub is a copy per Python X.Y)."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise ServerError("nvidia-pytriton is not installed: pip install 'safejudge[server]'")
        package = Path(next(iter(spec.submodule_search_locations)))
        home = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=home / "bin" / "tritonserver",
            python_backend=home / "backends" / "python",
            stub=home / "python_backend_stubs" / version / STUB_NAME,
            library_dirs=(package.parent / "nvidia_pytriton.libs",),
            origin=f"nvidia-pytriton wheel ({home})",
        )
        return install.checked(f"nvidia-pytriton has no Python-backend stub for Python {version}")

    @classmethod
    def from_home(cls, home: Path) -> TritonInstall:
        """A Triton installed the way NVIDIA's containers install it (bin/, lib/, backends/python/)."""
        home = Path(home)
        install = cls(
            binary=home / "bin" / "tritonserver",
            python_backend=home / "backends" / "python",
            stub=home / "backends" / "python" / STUB_NAME,
            library_dirs=(home / "lib",),
            origin=f"Triton at {home}",
        )
        return install.checked(f"{home} is not a Triton installation")

    def checked(self, problem: str) -> TritonInstall:
        for path in (self.binary, self.python_backend / "libtriton_python.so", self.stub):
            if not path.exists():
                raise ServerError(f"{problem}: {path} is missing")
        return self


def find_triton(choice: str = "auto", container_home: Path = CONTAINER_TRITON_HOME) -> TritonInstall:
    """`auto`: the environment's own Triton when there is one (an NVIDIA container's /opt/tritonserver, with
    the Python backend and stub that match its Python), else the nvidia-pytriton wheel's; `wheel`; or the
    path of a Triton home directory."""
    if choice == "wheel":
        return TritonInstall.from_wheel()
    if choice == "auto":
        if (container_home / "bin" / "tritonserver").exists():
            return TritonInstall.from_home(container_home)
        return TritonInstall.from_wheel()
    return TritonInstall.from_home(Path(choice).expanduser())


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (tests start servers on these)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (for values substituted into config.pbtxt)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def render_repository(source: Path, target: Path, values: Mapping[str, str]) -> None:
    """Copy a model repository, filling `${name}` placeholders of every config.pbtxt from values."""
    if not source.is_dir():
        raise ServerError(f"model repository {source} is not a directory")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for config in target.glob("*/config.pbtxt"):
        try:
            config.write_text(Template(config.read_text()).substitute(values))
        except (KeyError, ValueError) as exc:
            raise ServerError(f"{config.relative_to(target)}: placeholder {exc} has no value") from exc


def _missing_libraries(binary: Path, env: Mapping[str, str]) -> list[str]:
    """Shared libraries `ldd` cannot resolve for binary (a stub with any of these hangs the server)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    result = subprocess.run([ldd, str(binary)], env=dict(env), capture_output=True, text=True, check=False)
    return [line.strip() for line in result.stdout.splitlines() if "not found" in line]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for gRPC over TLS; with `ca`, clients must present a certificate it signed (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class Recovery:
    """One stage brought back by the supervisor: its process died, or it stopped answering probes ("hung")."""

    model: str
    pid: int
    died_at: float  # when the supervisor noticed
    restored_at: float | None = None
    error: str | None = None
    cause: str = "died"

    @property
    def seconds(self) -> float | None:
        return None if self.restored_at is None else self.restored_at - self.died_at


@dataclass(frozen=True)
class ProbeSettings:
    """How the supervisor checks that a stage still answers.

    Every `interval_s` it sends `model` a probe (safejudge.pipeline.is_probe: answered before any work) with
    a deadline of `deadline_s`. A probe is missed when it got no answer from the stage within its deadline and
    no execution of the model finished meanwhile (a busy stage finishes batches; one batch is judged to its end
    before the next starts, so a probe may wait for up to a request's whole timeout). `misses` in a row: the
    stage is taken for hung, its processes are killed and it is reloaded like a dead one.
    """

    model: str = "safety_judge"
    interval_s: float = 10.0
    deadline_s: float = 90.0
    misses: int = 2


# Added to the request timeout for the probe's default deadline: a request's last MLLM call may run past its
# deadline (it is checked before each call), and a probe waits for the batch in progress.
PROBE_DEADLINE_MARGIN_S = 30.0
# The supervisor's retries: 1 s, doubling, at most 30 s apart, for as long as the server runs.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


def _backoff(delay: float) -> float:
    return min(delay * 2, BACKOFF_MAX_S)


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...); None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (Z: zombie), None when the process is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def stub_processes(server_pid: int) -> dict[int, str]:
    """The live Python-backend stubs of one tritonserver: pid -> the model it runs."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat_fields(entry.name)
        if stat is None:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # argv: <stub> <model dir>/<version>/model.py <shm region> ... <instance name> <...>
        if int(stat[1]) == server_pid and stat[0] != "Z" and argv[0].endswith(STUB_NAME.encode()) and len(argv) > 1:
            stubs[int(entry.name)] = Path(argv[1].decode()).parents[1].name
    return stubs


class StageSupervisor(threading.Thread):
    """Brings a stage back after its process died (kill -9, OOM) or after it stopped answering: Triton 2.51
    itself never restarts a stub, keeps reporting the model ready while every request to it fails, and never
    notices a stub that hangs.

    Polls the stubs' pids; when one is gone its model is unloaded at once (readiness turns false: the server
    runs with --strict-readiness) and loaded again through the model-control API. With `probe`, a second
    thread probes that model (ProbeSettings) and kills the processes of a stage that stopped answering, which
    the poll then reloads the same way. Neither thread stops for good while the server runs: every error (a
    refused connection, a timeout, anything else) is reported through `on_event` and retried with backoff
    (BACKOFF_FIRST_S doubling to BACKOFF_MAX_S), and a reload is retried until it succeeds. `http_url` is the
    server's HTTP address, read at every attempt.
    """

    def __init__(self, server: TritonServer, poll_s: float = 0.2, probe: ProbeSettings | None = None):
        super().__init__(name="safejudge-stage-supervisor", daemon=True)
        self.server = server
        self.poll_s = poll_s
        self.probe = probe
        self.http_url = server.http_url
        self.recoveries: list[Recovery] = []
        self.stopping = threading.Event()
        self.on_event = lambda message: logger.warning("%s", message)
        self.prober: threading.Thread | None = None
        self._process = server.process
        # Listed before start() returns: a stage that dies from then on is noticed (None: run() lists them).
        try:
            self._stubs: dict[int, str] | None = stub_processes(self._process.pid)
        except OSError:
            self._stubs = None
        # model -> (when, one pid) of a stage the prober found hung and killed; the poll reloads it. The lock
        # makes "recorded and killed" one step for the poll.
        self._hung: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        # Processes of a reloaded stage's old instances, killed if still there `retire_grace_s` after the reload:
        # Triton unloads in the background, and an unload that waits on a killed sibling never ends, leaking
        # the old instances' processes (and their models' memory).
        self.retire_grace_s = 30.0
        self.retiring: dict[int, tuple[str, float]] = {}  # pid -> (model, when it is killed)

    def _client(self, network_timeout: float, connection_timeout: float = 10.0):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(
            self.http_url, connection_timeout=connection_timeout, network_timeout=network_timeout
        )

    def run(self) -> None:
        if self.probe is not None:
            self.prober = threading.Thread(target=self._probe_loop, name="safejudge-stage-prober", daemon=True)
            self.prober.start()
        stubs, delay = self._stubs, BACKOFF_FIRST_S
        while not self.stopping.is_set() and self._process.poll() is None:
            try:
                if stubs is None:
                    stubs = stub_processes(self._process.pid)
                with self._lock:
                    hung = dict(self._hung)
                dead = {pid: model for pid, model in stubs.items() if _process_state(pid) in (None, "Z")}
                reload: dict[str, int] = {model: pid for model, (_, pid) in hung.items()}
                for pid, model in dead.items():
                    reload.setdefault(model, pid)
                for model, pid in reload.items():
                    self._restore(model, pid)
                if reload:
                    # The reloaded stages' new processes. Old ones may outlive the unload call for a while (Triton
                    # unloads in the background): their exit is expected, not a death.
                    listed = stub_processes(self._process.pid)
                    retire_at = time.monotonic() + self.retire_grace_s
                    self.retiring |= {pid: (m, retire_at) for pid, m in listed.items() if m in reload and pid in stubs}
                    stubs = {pid: m for pid, m in listed.items() if pid not in self.retiring}
                self._retire()
                delay = BACKOFF_FIRST_S
            except Exception as exc:  # noqa: BLE001 - the supervisor must outlive its own faults
                stubs = None
                self.on_event(f"supervisor: {type(exc).__name__}: {exc}; retrying in {delay:g} s")
                if self.stopping.wait(delay):
                    return
                delay = _backoff(delay)
                continue
            self.stopping.wait(self.poll_s)

    def _retire(self) -> None:
        """Kill old instances of reloaded stages still running past their grace period."""
        now = time.monotonic()
        for pid, (model, retire_at) in list(self.retiring.items()):
            if _process_state(pid) in (None, "Z"):
                del self.retiring[pid]
            elif now >= retire_at:
                del self.retiring[pid]
                self.on_event(f"stage {model}: old process {pid} still running {self.retire_grace_s:g} s after the "
                              "reload; killing it")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _restore(self, model: str, pid: int) -> None:
        """Unload and load `model` until that succeeds, the server exits or the supervisor stops."""
        with self._lock:
            hung = self._hung.pop(model, None)
        cause, noticed_at = ("died", time.monotonic()) if hung is None else ("hung", hung[0])
        self.on_event(f"stage {model} (pid {pid}) {'died' if hung is None else 'stopped answering'}; reloading it")
        headers = {ADMIN_HEADER: self.server.admin_key}
        unloaded, attempt, delay = False, 0, BACKOFF_FIRST_S
        while True:
            attempt += 1
            try:
                with self._client(network_timeout=self.server.ready_timeout) as client:
                    if not unloaded:
                        client.unload_model(model, headers=headers)
                        unloaded = True
                    client.load_model(model, headers=headers)
                break
            except Exception as exc:  # noqa: BLE001 - refused connections, timeouts, Triton's errors: all retried
                error = f"{type(exc).__name__}: {exc}"
                self.on_event(f"stage {model}: reload attempt {attempt} failed ({error}); retrying in {delay:g} s")
                if self.stopping.wait(delay) or self._process.poll() is not None:
                    self.recoveries.append(Recovery(model, pid, noticed_at, None, error, cause))
                    return
                delay = _backoff(delay)
        recovery = Recovery(model, pid, noticed_at, time.monotonic(), cause=cause)
        self.recoveries.append(recovery)
        self.on_event(f"stage {model} restored in {recovery.seconds:.1f} s")

    # --- probing ---------------------------------------------------------------------------------------------

    def _probe_loop(self) -> None:
        probe = self.probe
        misses, wait, delay, sent = 0, probe.interval_s, BACKOFF_FIRST_S, 0
        while not self.stopping.wait(wait) and self._process.poll() is None:
            wait, sent = probe.interval_s, sent + 1
            try:
                outcome = self._probe_once(probe, sent)
                delay = BACKOFF_FIRST_S
            except Exception as exc:  # noqa: BLE001 - e.g. the HTTP port refuses: not the stage's fault
                self.on_event(f"probe of {probe.model} failed ({type(exc).__name__}: {exc}); retrying in {delay:g} s")
                misses, wait, delay = 0, delay, _backoff(delay)
                continue
            if outcome != "missed":
                misses = 0
                continue
            misses += 1
            self.on_event(
                f"stage {probe.model}: probe unanswered for {probe.deadline_s:g} s and no execution finished "
                f"({misses} of {probe.misses})"
            )
            if misses >= probe.misses:
                misses = 0
                self._kill_hung(probe.model)
            else:
                wait = 0.0  # the next probe at once

    def _probe_once(self, probe: ProbeSettings, number: int) -> str:
        """One probe: "answered" (by the stage), "not ready" (nothing to probe), "rejected" (by Triton for
        another reason: not the stage's doing), "progress" (unanswered, but executions finished meanwhile) or
        "missed". Connection errors raise."""
        from tritonclient.utils import InferenceServerException

        headers = {} if self.server.auth_token is None else {"authorization": f"Bearer {self.server.auth_token}"}
        timeouts = {"network_timeout": probe.deadline_s, "connection_timeout": min(probe.deadline_s, 10.0)}
        with self._client(**timeouts) as client:
            if not client.is_model_ready(probe.model):
                return "not ready"  # loading or unloaded: the supervisor is on it
            before = _executions(client, probe.model, headers)
        sent_at = time.monotonic()
        try:
            with self._client(**timeouts) as client:
                client.infer(
                    probe.model, probe_inputs(), request_id=f"{PROBE_REQUEST_PREFIX}{number}", headers=headers,
                    timeout=int(probe.deadline_s * 1e6),
                )
            return "answered"
        except InferenceServerException as exc:
            status = exc.status() or ""
            if status == "400":
                return "answered"  # refused by the stage itself (a stage that does not know probes)
            if status.startswith("4"):
                # Not found (unloading), forbidden: not the stage's doing, and nothing a reload mends.
                self.on_event(f"probe of {probe.model} rejected: {status} {exc.message()}")
                return "rejected"
            # 503 from the queue (full, or waited past its timeout), 500 from the Python backend (a stub that
            # does not answer its health check is "not healthy"): whether the stage works is told below.
        except TimeoutError:
            pass
        if self.stopping.wait(max(0.0, sent_at + probe.deadline_s - time.monotonic())):
            return "not ready"
        with self._client(**timeouts) as client:
            if not client.is_model_ready(probe.model):
                return "not ready"
            after = _executions(client, probe.model, headers)
        return "progress" if after != before else "missed"

    def _kill_hung(self, model: str) -> None:
        """Kill every process of a stage that stopped answering (SIGKILL also ends a stopped process); the poll
        reloads it."""
        with self._lock:
            pids = sorted(pid for pid, name in stub_processes(self._process.pid).items() if name == model)
            self.on_event(f"stage {model} stopped answering; killing its processes {pids} to reload it")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._hung[model] = (time.monotonic(), pids[0] if pids else 0)


def probe_inputs() -> list:
    """A probe's inputs: an empty IMAGE and CONSTITUTION (safejudge.pipeline.is_probe)."""
    import numpy as np
    import tritonclient.http as httpclient

    tensors = []
    for name in ("IMAGE", "CONSTITUTION"):
        tensor = httpclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b""]], dtype=object))
        tensors.append(tensor)
    return tensors


def _executions(client, model: str, headers: Mapping[str, str]) -> int:
    """Executions (batches) of `model` finished so far, from Triton's statistics."""
    stats = client.get_inference_statistics(model, headers=dict(headers))
    return sum(int(entry.get("execution_count", 0)) for entry in stats.get("model_stats", []))


def _connectable(host: str) -> str:
    """The address a local client reaches a server on that binds `host` (a wildcard: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class TritonServer:
    """One tritonserver process: prepare, start, wait until ready, supervise, stop, clean up.

    Ports given as 0 are replaced by free ports. Use as a context manager or call start()/stop().
    Models are loaded through the model-control API (explicit mode), which only this launcher may use
    (header ADMIN_HEADER with a per-server key); the supervisor reloads a stage whose process died.
    With `auth_token`, inference and the other non-health protocols need
    `authorization: Bearer <token>` (HTTP) / `triton-grpc-protocol-authorization: Bearer <token>` (gRPC);
    with `models_check_token` too, gRPC inference is left to the models, which get the credential headers
    (safejudge.pipeline.CREDENTIAL_HEADERS) as request parameters and must refuse a request without the token.
    """

    def __init__(
        self,
        repository: Path,
        *,
        template_values: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        ready_timeout: float = 300.0,
        grace_period: float = 15.0,
        threads: int | None = None,
        tritonserver: str = "auto",
        stub: Path | None = None,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        tls: TLSFiles | None = None,
        auth_token: str | None = None,
        models_check_token: bool = False,
        http_host: str | None = None,
        supervise: bool = True,
        probe: ProbeSettings | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.template_values = dict(template_values or {})
        self.host = host
        self.http_host = http_host or host
        bind_host = _connectable(host)
        self.grpc_port = grpc_port or free_port(bind_host)
        self.http_port = http_port or free_port(bind_host)
        self.metrics_port = metrics_port or free_port(bind_host)
        self.ready_timeout = ready_timeout
        self.grace_period = grace_period
        self.threads = threads
        self.tritonserver = tritonserver
        self.stub_override = stub
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.tls = tls
        self.auth_token = auth_token
        self.models_check_token = models_check_token
        self.admin_key = secrets.token_urlsafe(24)
        self.supervisor: StageSupervisor | None = None
        self.supervise = supervise
        self.probe = probe  # the supervisor's liveness probe of a stage (ProbeSettings); None: none
        self._http_connect_host = _connectable(self.http_host)
        self.shm_prefix = f"safejudge_{uuid.uuid4().hex[:12]}_"
        self.run_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self._connect_host = bind_host

    @property
    def url(self) -> str:
        """gRPC address for clients (tritonclient.grpc, safejudge_client)."""
        return f"{self._connect_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._http_connect_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self.run_dir / "tritonserver.log" if self.run_dir else None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def shm_regions(self) -> list[Path]:
        return sorted(SHM.glob(f"{self.shm_prefix}*"))

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [sysconfig.get_config_var("LIBDIR"), *map(str, install.library_dirs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in library_path if p)
        # The stub embeds Python and finds this venv's site-packages through `python3` on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Busy-waiting OpenMP threads of several stubs starve each other on a few cores; and with workers
        # spinning between requests, tritonserver 2.51 left a python stub idle for 0.5 s after some requests
        # (benchmarks/RESULTS.md "Served path").
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def _prepare(self, install: TritonInstall, env: Mapping[str, str]) -> list[str]:
        self.run_dir = Path(tempfile.mkdtemp(prefix="safejudge-triton-"))
        backend = self.run_dir / "backends" / "python"
        backend.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (backend / name).symlink_to(install.python_backend / name)
        stub = backend / STUB_NAME
        shutil.copy2(self.stub_override or install.stub, stub)
        missing = _missing_libraries(stub, env)
        if missing:
            raise ServerError(f"the Python-backend stub {stub.name} cannot load: " + "; ".join(missing))
        models = self.run_dir / "models"
        render_repository(self.repository, models, self.template_values)
        return [
            str(install.binary),
            f"--model-repository={models}",
            f"--backend-directory={self.run_dir / 'backends'}",
            f"--grpc-address={self.host}",
            f"--http-address={self.http_host}",
            f"--metrics-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--backend-config=python,shm-default-byte-size=4194304",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--strict-readiness=true",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self.admin_key}",
            f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self.admin_key}",
            *self._security_args(),
            *self.extra_args,
        ]

    def _security_args(self) -> list[str]:
        args = []
        if self.auth_token is not None:
            grpc_protocols = GRPC_TOKEN_PROTOCOLS_MODELS_CHECK if self.models_check_token else TOKEN_PROTOCOLS
            args += [
                f"--grpc-restricted-protocol={grpc_protocols}:authorization=Bearer {self.auth_token}",
                f"--http-restricted-api={TOKEN_PROTOCOLS}:authorization=Bearer {self.auth_token}",
            ]
            if self.models_check_token:
                headers = "|".join(CREDENTIAL_HEADERS)
                # Header names are case-insensitive (HTTP clients send `Authorization`).
                pattern = f"(?i)^({headers})$"
                args += [f"--grpc-header-forward-pattern={pattern}", f"--http-header-forward-pattern={pattern}"]
        if self.tls is not None:
            args += [f"--grpc-server-cert={self.tls.cert}", f"--grpc-server-key={self.tls.key}"]
            if self.tls.ca is not None:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.tls.ca}"]
            else:
                args += ["--grpc-use-ssl=true"]
        return args

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("server already started")
        install = find_triton(self.tritonserver)
        env = self.environment(install)
        try:
            command = self._prepare(install, env)
            with open(self.log_path, "wb") as log:
                # Own session: a terminal's Ctrl-C reaches only the launcher, which shuts down in order.
                self.process = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self.supervisor = StageSupervisor(self, probe=self.probe)
            self.supervisor.start()
        return self

    def is_ready(self) -> bool:
        """Triton's own readiness (strict: every model loaded and ready), over HTTP like a probe."""
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        try:
            with httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0) as client:
                return client.is_server_ready()
        except (InferenceServerException, OSError):
            return False

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"last log lines:\n{self.log_tail()}"
                )
            # The ports open only after every model loaded: refused connections are expected.
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"tritonserver was not ready after {self.ready_timeout:.0f} s (a model or its stub may "
                    f"hang while loading); last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def wait(self) -> int:
        """Block until the server process exits; its exit code."""
        if self.process is None:
            raise ServerError("server not started")
        return self.process.wait()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the grace period, then remove the run directory and /dev/shm regions."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stopping.set()
            supervisor.join(timeout=self.grace_period)
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.grace_period)
                except subprocess.TimeoutExpired:
                    pass
            try:
                # Also reaches stubs orphaned by a server that died or hung.
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        for region in self.shm_regions():
            region.unlink(missing_ok=True)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServeSettings(BaseModel):
    """Everything `safejudge serve` needs; becomes the model parameters of the repository's stages."""

    model_config = ConfigDict(extra="forbid")

    models: ModelSpec = Field(default_factory=ModelSpec)
    constitutions: Path = CONSTITUTIONS
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="compiled constitutions (priors, rule embeddings), reused across restarts",
    )
    host: str = "127.0.0.1"
    http_host: str | None = Field(None, description="address of the HTTP endpoint (health probes); default: host")
    grpc_port: int = Field(8001, ge=0, le=65535, description="0: any free port")
    http_port: int = Field(8000, ge=0, le=65535)
    metrics_port: int = Field(8002, ge=0, le=65535)
    judge_instances: int | None = Field(
        None, ge=1,
        description="processes of the safety_judge model, each with its own models; None: as many as the cores "
        "hold at the model's threads (instances())",
    )
    max_batch: int = Field(8, ge=1, description="requests one instance judges side by side, their MLLM calls merged")
    # 0: a lone request goes at once, and requests that arrive while the instance is busy still leave
    # together (benchmarks/RESULTS.md "Served path").
    batch_delay_us: int = Field(0, ge=0, description="how long the batcher waits for more requests to judge together")
    max_queue: int = Field(64, ge=1, description="requests waiting per stage; more are refused (UNAVAILABLE)")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    tls_ca: FilePath | None = Field(None, description="clients must present a certificate signed by this CA")
    auth_token_file: FilePath | None = None
    ready_timeout: float = Field(300.0, gt=0)
    probe_interval_s: float = Field(
        10.0, ge=0, description="seconds between the supervisor's liveness probes of safety_judge; 0: no probes"
    )
    probe_deadline_s: float | None = Field(
        None, gt=0,
        description="a probe unanswered this long with no batch finished meanwhile is missed, two in a row restart "
        "the stage; default: the request timeout + 30 s (a busy stage judges a batch to its end first)",
    )
    tritonserver: str = Field("auto", description="auto | wheel | the path of a Triton home (find_triton)")
    repository: Path = MODEL_REPOSITORY

    @model_validator(mode="after")
    def _tls_complete(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        return self

    def instances(self) -> int:
        """judge_instances, else cores / the model's threads: one instance of a real model on all cores, one
        per core for the small tiny models (a single process is bound by Python's GIL there: concurrency 4
        judged 1.3x the verdicts/s of concurrency 1 with one instance, 2.2x with two on 2 cores)."""
        if self.judge_instances is not None:
            return self.judge_instances
        cores = len(os.sched_getaffinity(0))
        return max(1, cores // served_threads(self.models, cores))

    def threads_per_instance(self) -> int:
        return served_threads(self.models, len(os.sched_getaffinity(0)) // self.instances())

    def probe(self) -> ProbeSettings | None:
        """The supervisor's probe of safety_judge; its deadline defaults to the request timeout + 30 s."""
        if self.probe_interval_s == 0:
            return None
        deadline = self.probe_deadline_s or self.limits.request_timeout_s + PROBE_DEADLINE_MARGIN_S
        return ProbeSettings(interval_s=self.probe_interval_s, deadline_s=deadline)

    def auth_token(self) -> str | None:
        if self.auth_token_file is None:
            return None
        return read_token(self.auth_token_file)

    def template_values(self) -> dict[str, str]:
        constitutions = self.constitutions.resolve()
        if not constitutions.is_dir():
            raise ServerError(f"constitution directory {self.constitutions} does not exist")
        token = self.auth_token()
        judge = JudgeStageSettings(
            models=self.models.model_copy(update={"threads": self.threads_per_instance()}),
            constitutions=constitutions,
            cache_dir=self.cache_dir.resolve(),
            limits=self.limits,
            token_sha256=None if token is None else token_digest(token),
        )
        return {
            "judge_settings": pbtxt_string(judge.model_dump_json()),
            "judge_instances": str(self.instances()),
            "max_batch": str(self.max_batch),
            "batch_delay_us": str(self.batch_delay_us),
            "max_queue": str(self.max_queue),
            "queue_timeout_us": str(int(self.limits.request_timeout_s * 1e6)),
        }

    def server(self) -> TritonServer:
        """The (not yet started) server for these settings."""
        tls = None if self.tls_cert is None else TLSFiles(self.tls_cert, self.tls_key, self.tls_ca)
        return TritonServer(
            self.repository,
            template_values=self.template_values(),
            host=self.host,
            http_host=self.http_host,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            ready_timeout=self.ready_timeout,
            threads=self.threads_per_instance(),
            tritonserver=self.tritonserver,
            tls=tls,
            auth_token=self.auth_token(),
            models_check_token=True,
            probe=self.probe(),
        )


def read_token(path: Path) -> str:
    """A bearer token from a file: one line of printable characters without spaces."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ServerError(f"cannot read the token file {path}: {exc}") from exc
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise ServerError(f"the token file {path} must hold one token: printable characters, no spaces")
    return token
