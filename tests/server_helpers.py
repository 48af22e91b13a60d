"""Helpers for the server tests: the shared deployment's name and prompts, process inspection
through /proc, SSE parsing, gRPC stubs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from protos import mii_pb2 as pb
from protos import mii_pb2_grpc as pb_grpc

# The deployment that the test_server_api_* modules share (the session fixture `dep` in conftest.py)
NAME = "tiny-api"
PROMPTS = ["DeepSpeed is", "Seattle is"]


def children_of(pid: int | None = None) -> set[int]:
    """Live (non-zombie) processes whose parent is ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            found.add(int(d.name))
    return found


def process_exists(pid: int) -> bool:
    """True if ``pid`` is a live, non-zombie process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def sse_events(lines) -> list:
    """Parse SSE ``data:`` lines into JSON objects; the literal [DONE] is kept as a string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def worker_stub(address: str) -> pb_grpc.WorkerStub:
    return pb_grpc.WorkerStub(grpc.insecure_channel(address))


def model_info(address: str) -> pb.ModelInfoResponse:
    return worker_stub(address).ModelInfo(pb.ModelInfoRequest(), timeout=5)


def wait_idle(addresses: list[str], timeout: float = 10.0) -> list[pb.ModelInfoResponse]:
    """Poll the workers until none runs a request and all KV blocks are free; return their infos."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        infos = [model_info(a) for a in addresses]
        idle = all(i.num_running == 0 and i.num_waiting == 0 and i.kv_blocks_free == i.kv_blocks_total
                   for i in infos)
        if idle or time.monotonic() > deadline:
            return infos
        time.sleep(0.05)
