"""Deployments starting, losing a replica, failing to start, and going away without orphans."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from mii import api
from server import registry
from server.launcher import DeploymentError, owned
from tests.server_helpers import children_of, process_exists, sse_events


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_exists(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if process_exists(p)]


def _counter(scrape: str, name: str, labels: str) -> float:
    """One Prometheus counter from a /metrics scrape (0 before it is first counted)."""
    m = re.search(rf"^{name}{{{labels}}} (\S+)$", scrape, re.M)
    return float(m.group(1)) if m else 0.0


def test_replica_loss_then_terminate_leaves_no_children(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("LlamaForCausalLM"))
    reg = tmp_path / "deployments.json"
    before = children_of()
    client = api.deploy(model, "tiny-loss", replica_num=2, num_kv_blocks=256, registry_path=reg, startup_timeout=180)
    dep = owned("tiny-loss")
    pids = [c.pid for c in dep.children]
    assert len(children_of() - before) == 3 and registry.lookup("tiny-loss", reg).pids == pids

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {"model": "tiny-loss", "prompt": f"Request {i}", "max_tokens": 240, "ignore_eos": True}
        if i % 2:
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = sse_events([line async for line in r.aiter_lines()])
            if events[-1] == "[DONE]":
                return "ok"
            assert "replica" in events[-1]["error"]["message"], events[-1]
            return "error"
        r = await http.post("/v1/completions", json=body)
        if r.status_code == 200:
            return "ok"
        assert r.status_code == 502 and "replica 1" in r.json()["error"]["message"], r.text
        return "error"

    async def load_and_kill() -> list[str]:
        # Replica 1 must die mid-generation, with tokens already through the gateway, so that its
        # open calls fail (a call that dies before its first token is retried on replica 0). A
        # fixed wait raced the tiny model on a loaded 2-core machine: the kill came before any
        # token, or after replica 1 had finished. So replica 1 runs at a tenth of its speed
        # (SIGSTOP/SIGCONT, 5 ms in 50: slow enough to watch, quick enough for its health checks),
        # and is killed once, frozen, the gateway holds tokens of a request it has not finished
        # (each finished request brought 240).
        victim = dep.workers[1].pid

        def throttle(stop: threading.Event):
            while not stop.is_set():
                os.kill(victim, signal.SIGCONT)
                time.sleep(0.005)
                os.kill(victim, signal.SIGSTOP)
                time.sleep(0.045)

        def throttled() -> tuple[threading.Event, threading.Thread]:
            stop = threading.Event()
            thread = threading.Thread(target=throttle, args=(stop,))
            thread.start()
            return stop, thread

        def unfinished(scrape: str) -> bool:
            tokens = _counter(scrape, "mii_generation_tokens_total", 'replica="1"')
            return tokens > 240 * _counter(scrape, "mii_replica_requests_total", 'outcome="ok",replica="1"')

        async with httpx.AsyncClient(base_url=client.url, timeout=90) as http:
            stop, slow = throttled()
            tasks = [asyncio.create_task(one(http, i)) for i in range(16)]
            try:
                async with asyncio.timeout(60):
                    while True:
                        while not unfinished((await http.get("/metrics")).text):
                            await asyncio.sleep(0.05)
                        stop.set()
                        await asyncio.to_thread(slow.join)  # it leaves replica 1 stopped
                        await asyncio.sleep(0.3)  # the gateway takes in what replica 1 had sent
                        if unfinished((await http.get("/metrics")).text):  # its probe of replica 1 times out (2 s)
                            break
                        stop, slow = throttled()  # a loaded gateway had counted late: go on
            finally:
                stop.set()
                slow.join()
                os.kill(victim, signal.SIGKILL)
            # sent right after the kill, before any health check: retried on replica 0 if it lands on 1
            after = [await http.post("/v1/completions", json={"model": "tiny-loss", "prompt": "x", "max_tokens": 4})
                     for _ in range(4)]
            assert all(r.status_code == 200 for r in after), [r.text for r in after]
            return await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)  # nothing hangs

    outcomes = asyncio.run(load_and_kill())
    assert "ok" in outcomes and "error" in outcomes, outcomes  # replica 0's finished, 1's failed clearly
    with httpx.Client(base_url=client.url, timeout=30) as http:
        for _ in range(6):
            assert http.post(f"/mii/tiny-loss", json={"request": {"query": "x"}}).status_code == 200
        time.sleep(1.5)  # one health-check period
        assert http.get("/health").json()["replicas_up"] == 1
        assert 'mii_replica_up{replica="1"} 0.0' in http.get("/metrics").text

    api.terminate("tiny-loss", registry_path=reg)
    assert children_of() - before == set()
    assert _wait_gone(pids, timeout=1) == []
    with pytest.raises(ValueError, match="no running deployment"):
        api.mii_query_handle("tiny-loss", registry_path=reg)


def test_failed_start_reports_log_tail_and_cleans_up(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"],
                                                    "model_type": "no-such-type"}))
    before = children_of()
    with pytest.raises(DeploymentError, match="worker-0.*exited") as e:
        api.deploy(str(broken), "broken", registry_path=tmp_path / "r.json", startup_timeout=120)
    assert "no-such-type" in str(e.value) or "NoSuchForCausalLM" in str(e.value)  # the worker's own error
    kept = re.search(r"logs kept in (\S+)\)", str(e.value)).group(1)
    assert (Path(kept) / "worker-0.log").is_file()
    shutil.rmtree(kept)
    assert children_of() - before == set()
    assert registry.entries(tmp_path / "r.json") == []
    with pytest.raises(ValueError, match="not a local directory"):  # caught before any process starts
        api.deploy(str(tmp_path / "missing"), "missing", registry_path=tmp_path / "r.json")


def test_argument_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel must be a positive integer"):
        api.deploy("m", "tp", tensor_parallel=0, registry_path=tmp_path / "r.json")
    with pytest.raises(ValueError, match="unknown deployment argument"):
        api.deploy("m", "bad", max_lenght=5, registry_path=tmp_path / "r.json")
    with pytest.raises(ValueError, match="replicas must be a positive integer"):
        api.deploy("m", "bad", replica_num=0, registry_path=tmp_path / "r.json")


def test_registry_drops_dead_owners(tmp_path):
    path = tmp_path / "r.json"
    registry.register(registry.Entry("mine", "http://x", [], [], os.getpid()), path)
    registry.register(registry.Entry("ghost", "http://y", [], [], 2**22 + 12345), path)  # no such pid
    assert [e.name for e in registry.entries(path)] == ["mine"]
    with pytest.raises(ValueError, match="already running"):
        registry.register(registry.Entry("mine", "http://z", [], [], os.getpid()), path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    registry.remove("mine", path)
    assert registry.entries(path) == []


@pytest.mark.slow
def test_interpreter_exit_tears_down(tiny_model_dir, tmp_path):
    """A script that deploys and just exits leaves no processes behind (atexit)."""
    script = textwrap.dedent(f"""
        import json, mii.api, server.launcher
        c = mii.api.deploy({str(tiny_model_dir("LlamaForCausalLM"))!r}, "exit-test", num_kv_blocks=64,
                           registry_path={str(tmp_path / "r.json")!r})
        print(json.dumps([ch.pid for ch in server.launcher.owned("exit-test").children]), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(pids) == 2 and _wait_gone(pids, timeout=10) == []


@pytest.mark.slow
def test_cli_serve_until_sigterm(tiny_model_dir, tmp_path):
    reg = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "mii.cli", "serve", str(tiny_model_dir("LlamaForCausalLM")),
                             "--name", "cli-test", "--port", "0", "--replicas", "1", "--num-kv-blocks", "64", "--no-prefix-caching",
                             "--registry", str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, line
        entry = registry.lookup("cli-test", reg)
        with httpx.Client(base_url=entry.url, timeout=30) as http:
            r = http.post("/v1/completions", json={"model": "cli-test", "prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert _wait_gone(entry.pids, timeout=5) == []
        assert registry.entries(reg) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
