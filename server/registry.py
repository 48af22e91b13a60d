"""A small per-user file that maps deployment names to where they listen and which
processes serve them, so ``mii.mii_query_handle(name)`` and ``mii query NAME`` work from
any process. Entries whose owner process is gone are dropped on every read."""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

DEFAULT_PATH = Path.home() / ".cache" / "mii-serve" / "deployments.json"


@dataclass(slots=True)
class Entry:
    """One live deployment.

    url: the gateway's base URL. workers: each replica's gRPC host:port.
    pids: the gateway and worker processes (each leads its own process group).
    owner_pid: the process that launched them and tears them down.
    """

    name: str
    url: str
    workers: list[str]
    pids: list[int]
    owner_pid: int
    model: str | None = None
    api_key: str | None = None
    run_dir: str = ""
    extra: dict = field(default_factory=dict)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it only waits for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def _locked(path: Path) -> Iterator[dict[str, dict]]:
    """The registry's contents under an exclusive lock; changes are written back atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            data = {}
        before = json.dumps(data, sort_keys=True)
        data = {k: v for k, v in data.items() if alive(v["owner_pid"])}
        yield data
        if json.dumps(data, sort_keys=True) != before:
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            # the file may hold API keys: readable by this user only
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
            os.replace(tmp, path)


def register(entry: Entry, path: Path | None = None) -> None:
    """Record a deployment; its name must not be in use by a live one."""
    with _locked(path or DEFAULT_PATH) as data:
        if entry.name in data:
            raise ValueError(f"a deployment named {entry.name!r} is already running "
                             f"(pid {data[entry.name]['owner_pid']}); terminate it or pick another name")
        data[entry.name] = asdict(entry)


def reserve(name: str, path: Path | None = None) -> None:
    """Fail early, before starting processes, if ``name`` is taken."""
    with _locked(path or DEFAULT_PATH) as data:
        if name in data:
            raise ValueError(f"a deployment named {name!r} is already running (pid {data[name]['owner_pid']})")


def lookup(name: str, path: Path | None = None) -> Entry:
    with _locked(path or DEFAULT_PATH) as data:
        if name not in data:
            raise ValueError(f"no running deployment named {name!r}; running: {sorted(data) or 'none'}")
        return Entry(**data[name])


def remove(name: str, path: Path | None = None) -> None:
    with _locked(path or DEFAULT_PATH) as data:
        data.pop(name, None)


def entries(path: Path | None = None) -> list[Entry]:
    with _locked(path or DEFAULT_PATH) as data:
        return [Entry(**v) for v in data.values()]


def announce(ready_file: str | os.PathLike, **info) -> None:
    """A child process (worker, gateway) tells its launcher it is up, and where: the file
    appears whole or not at all."""
    path = Path(ready_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
