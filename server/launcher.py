"""Start a deployment's processes, wait until they are healthy, and tear them down.

One worker process per replica (each owning its GPUs through CUDA_VISIBLE_DEVICES), then
one gateway. Each child gets its config as a JSON file in the deployment's run directory,
binds port 0 and reports the port it got in a ready file. Each child leads its own
process group, which teardown signals as a whole; children also ask the kernel for
SIGTERM when their parent dies, and an atexit hook tears down whatever this process
still owns, so no exit path leaves orphans.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import server
from mii.config import EngineConfig
from mii.model.source import resolve_model_path
from server import registry
from server.gateway import GatewayConfig

_ROOT = Path(server.__file__).resolve().parent.parent  # children run here, so `-m server.x` is ours
_LIVE: dict[str, "Deployment"] = {}


class DeploymentError(RuntimeError):
    """A process of the deployment failed to start; the message carries its log's tail."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: atexit and terminate() still clean up
        pass


class Child:
    """One process of a deployment, with its log and ready file."""

    def __init__(self, name: str, cmd: list[str], run_dir: Path, env: dict[str, str]):
        self.name = name
        self.log_path = run_dir / f"{name}.log"
        self.ready_file = run_dir / f"{name}.ready"
        self.info: dict = {}
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen([*cmd, "--ready-file", str(self.ready_file)], cwd=_ROOT, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def check_ready(self) -> bool:
        rc = self.popen.poll()
        if rc is not None:
            raise DeploymentError(f"{self.name} (pid {self.pid}) exited with code {rc} while starting; "
                                  f"last lines of {self.log_path}:\n{self.tail()}")
        if self.ready_file.is_file():
            self.info = json.loads(self.ready_file.read_text())
            return True
        return False

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal_group(self, sig: int) -> None:
        _signal_group(self.pid, sig)


def _wait_ready(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending:
        pending = [c for c in pending if not c.check_ready()]
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.tail()}" for c in pending)
            raise DeploymentError(f"{', '.join(c.name for c in pending)} not ready after {timeout:.0f}s:\n{tails}")
        time.sleep(0.05)


def gpu_sets(replicas: int, tensor_parallel: int, device: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES for each replica, or None when running on CPU."""
    if device is not None and not device.startswith("cuda"):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch
        devices = [str(i) for i in range(torch.cuda.device_count())]
    if not devices:
        if device is not None:
            raise ValueError(f"device={device!r} but no CUDA device is visible")
        return None
    need = replicas * tensor_parallel
    if len(devices) < need:
        raise ValueError(f"{replicas} replica(s) x tensor_parallel={tensor_parallel} need {need} GPUs; "
                         f"{len(devices)} visible ({','.join(devices)})")
    return [",".join(devices[i * tensor_parallel:(i + 1) * tensor_parallel]) for i in range(replicas)]


class Deployment:
    """The running processes of one named deployment, owned by this process."""

    def __init__(self, name: str, run_dir: Path, registry_path: Path | None):
        self.name, self.run_dir, self.registry_path = name, run_dir, registry_path
        self.workers: list[Child] = []
        self.gateway: Child | None = None
        self.url = ""
        self.worker_addresses: list[str] = []
        self.api_key: str | None = None

    @property
    def children(self) -> list[Child]:
        return ([self.gateway] if self.gateway else []) + self.workers

    def terminate(self, timeout: float = 10.0, keep_run_dir: bool = False) -> None:
        """SIGTERM every process group (gateway first, so it stops routing), SIGKILL what
        is left after ``timeout``, reap, and forget the deployment."""
        for c in self.children:
            c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in self.children:
            try:
                c.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.signal_group(signal.SIGKILL)
                c.popen.wait()
            c.signal_group(signal.SIGKILL)  # anything the child started and left in its group
        _LIVE.pop(self.name, None)
        registry.remove(self.name, self.registry_path)
        if not keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def launch(name: str, engine: EngineConfig, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 0,
           api_key: str | None = None, max_queued_requests: int = 1024, request_timeout: float | None = 600.0,
           startup_timeout: float = 600.0, model_names: list[str] | None = None,
           registry_path: Path | None = None) -> Deployment:
    """Start ``replicas`` workers of ``engine`` and a gateway on host:port (0 = free port);
    return once the gateway reports every replica healthy."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    registry.reserve(name, registry_path)
    # Resolve here, once: a .gguf (or the embedded default) is converted a single time and
    # a hub id downloaded once, not by every replica; a bad name fails before any process starts.
    engine = engine.replace(model=str(resolve_model_path(engine.model, show_progress=engine.show_progress)))
    gateway_config = GatewayConfig(deployment=name, workers=["pending"], host=host, port=port, api_key=api_key,
                                   max_queued_requests=max_queued_requests, request_timeout=request_timeout,
                                   model_names=model_names or [])
    gpus = gpu_sets(replicas, engine.tensor_parallel, engine.device)
    run_dir = Path(tempfile.mkdtemp(prefix=f"mii-{name}-"))
    engine_file = run_dir / "engine.json"
    engine_file.write_text(json.dumps(_engine_fields(engine)))

    dep = Deployment(name, run_dir, registry_path)
    _LIVE[name] = dep
    try:
        for i in range(replicas):
            env = dict(os.environ)
            if gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i]
            elif "OMP_NUM_THREADS" not in env:  # replicas share the CPU cores rather than fight over them
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // replicas))
            dep.workers.append(Child(f"worker-{i}", [sys.executable, "-m", "server.worker", str(engine_file),
                                                     "--replica-id", str(i)], run_dir, env))
        _wait_ready(dep.workers, startup_timeout)
        dep.worker_addresses = [f"127.0.0.1:{w.info['port']}" for w in dep.workers]
        gateway_config.workers = dep.worker_addresses
        gateway_file = run_dir / "gateway.json"
        gateway_file.touch(mode=0o600)  # it may hold the API key
        gateway_file.write_text(gateway_config.to_json())
        dep.gateway = Child("gateway", [sys.executable, "-m", "server.gateway", str(gateway_file)], run_dir,
                            dict(os.environ))
        _wait_ready([dep.gateway], startup_timeout)
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        dep.url = f"http://{url_host}:{dep.gateway.info['port']}"
        _wait_healthy(dep.url, replicas, startup_timeout)
        dep.api_key = api_key
        registry.register(registry.Entry(
            name=name, url=dep.url, workers=dep.worker_addresses, pids=[c.pid for c in dep.children],
            owner_pid=os.getpid(), model=engine.model, api_key=api_key, run_dir=str(run_dir)), registry_path)
    except BaseException as e:
        dep.terminate(timeout=5, keep_run_dir=True)
        if isinstance(e, DeploymentError):
            raise DeploymentError(f"deployment {name!r} failed to start: {e}\n(logs kept in {run_dir})") from None
        raise
    return dep


def _wait_healthy(url: str, replicas: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                body = json.loads(r.read())
                if body.get("replicas_up") == replicas:
                    return
                last = str(body)
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise DeploymentError(f"gateway at {url} not healthy after {timeout:.0f}s: {last}")


def _engine_fields(engine: EngineConfig) -> dict:
    fields = asdict(engine)
    if fields["dtype"] is not None:
        fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    fields["model"] = str(Path(fields["model"]).resolve())  # children run in another cwd
    return fields


def owned(name: str) -> Deployment | None:
    """The deployment ``name`` if this process launched it."""
    return _LIVE.get(name)


def terminate(name: str, registry_path: Path | None = None, timeout: float = 10.0) -> None:
    """Tear down a deployment by name: directly if this process owns it, otherwise by
    signalling the process groups the registry lists."""
    if name in _LIVE:
        _LIVE[name].terminate(timeout)
        return
    entry = registry.lookup(name, registry_path)
    for pid in entry.pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(registry.alive(p) for p in entry.pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in entry.pids:
        _signal_group(pid, signal.SIGKILL)
    registry.remove(name, registry_path)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _terminate_all() -> None:
    for dep in list(_LIVE.values()):
        dep.terminate(timeout=5)
