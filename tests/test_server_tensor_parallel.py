"""A TP=2 replica served through the gateway (gloo ranks on CPU): same greedy text as
the in-process TP=1 pipeline; a dead rank takes the replica down cleanly."""
import os
import signal
import time

import httpx

import mii
from mii import api
from server.launcher import owned
from tests.server_helpers import children_of, process_exists

PROMPTS = ["DeepSpeed is", "Hello, my name is"]


def _rank_pids(worker_pid: int) -> list[int]:
    return sorted(children_of(worker_pid))


def test_tp2_deployment_serves_and_a_dead_rank_fails_clearly(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("LlamaForCausalLM"))
    ref = [o.generated_text for o in mii.pipeline(model, device="cpu", show_progress=False)(
        PROMPTS, max_new_tokens=16, temperature=0, ignore_eos=True)]
    reg = tmp_path / "deployments.json"
    client = api.deploy(model, "tiny-tp", tensor_parallel=2, device="cpu", registry_path=reg, startup_timeout=180)
    try:
        dep = owned("tiny-tp")
        with httpx.Client(base_url=client.url, timeout=60) as http:
            r = http.post("/mii/tiny-tp", json={"request": {"query": PROMPTS},
                                                 "kwargs": {"max_new_tokens": 16, "ignore_eos": True, "temperature": 0}})
            assert r.status_code == 200, r.text
            assert r.json()["response"] == ref
            ranks = _rank_pids(dep.workers[0].pid)
            assert len(ranks) >= 1, "the worker should have started its second rank"
            for pid in ranks:
                os.kill(pid, signal.SIGKILL)
            # No request needed: the worker watches its ranks and leaves (on GPUs a step in
            # flight could wait forever on the dead rank's all-reduce flag).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and http.get("/health").json().get("replicas_up") != 0:
                time.sleep(0.2)
            assert http.get("/health").json()["replicas_up"] == 0
            assert dep.workers[0].popen.wait(timeout=10) == 3
            r = http.post("/v1/completions", json={"model": "tiny-tp", "prompt": "x", "max_tokens": 4})
            assert 500 <= r.status_code < 600 and r.status_code != 500, r.text
            assert "replica" in r.text, r.text
    finally:
        api.terminate("tiny-tp", registry_path=reg)
    assert not any(process_exists(p) for p in ranks)
