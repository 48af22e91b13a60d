"""Deploy a model as a service, and talk to it.

    mii.deploy(model, deployment_name="bloom", replica_num=2, dtype="fp16")  # MII legacy; returns once healthy
    handle = mii.mii_query_handle("bloom")                                 # from any process of this user
    handle.query({"query": ["DeepSpeed is", "Seattle is"]}, max_new_tokens=32)
    mii.terminate("bloom")

    client = mii.serve(model)          # FastGen style: deploy under a fresh name, get a client
    client.generate(["Hi"], max_new_tokens=8); client.terminate_server()

A deployment is one worker process per replica (gRPC, one engine each) and one gateway
(HTTP: legacy route, OpenAI API, metrics). It lives as long as the process that deployed
it: ``terminate`` or that process's exit stops every child.
"""
from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

from mii.config import EngineConfig
from server.client import MIIClient

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "tensor_parallel"}


def deploy(model: str | None = None, deployment_name: str | None = None, *, tensor_parallel: int = 1,
           replica_num: int = 1, enable_restful_api: bool = True, restful_api_port: int = 0,
           restful_api_host: str = "127.0.0.1", api_key: str | None = None, max_queued_requests: int = 1024,
           request_timeout: float | None = 600.0, startup_timeout: float = 600.0,
           registry_path: str | Path | None = None, task: str | None = None, mii_config: dict | None = None,
           **engine_kwargs) -> MIIClient:
    """Start a deployment and return a client for it once every replica is healthy.

    model: HF directory, .gguf file, hub id, or None for the embedded default model.
    deployment_name: how handles find it (default: the model's directory name).
    tensor_parallel: ranks per replica (GPUs on CUDA; gloo processes on CPU).
    replica_num: engine replicas, each its own process (and GPUs: CUDA_VISIBLE_DEVICES).
    restful_api_host / restful_api_port: where the gateway listens (port 0 = any free port).
        The gateway always runs, since it also balances the Python handle's requests;
        enable_restful_api=False keeps it on 127.0.0.1.
    api_key: require ``Authorization: Bearer <api_key>`` on every route but /health.
    max_queued_requests: requests admitted at once; beyond it the gateway answers 429.
    request_timeout: seconds a request may run before it is aborted (504).
    registry_path: the registry file (default ~/.cache/mii-serve/deployments.json).
    task, mii_config: MII's legacy arguments; mii_config's keys are merged into the kwargs.
    engine_kwargs: ``mii.EngineConfig`` fields: dtype, device, max_model_len, num_kv_blocks, ...
    """
    from server.launcher import launch

    if task not in (None, "text-generation"):
        raise ValueError(f"task {task!r} is not supported; only 'text-generation'")
    if mii_config:
        merged = dict(mii_config)
        tensor_parallel = merged.pop("tensor_parallel", tensor_parallel)
        replica_num = merged.pop("replica_num", replica_num)
        engine_kwargs = {**merged, **engine_kwargs}
    unknown = sorted(set(engine_kwargs) - _ENGINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown deployment argument(s) {unknown}; engine settings are {sorted(_ENGINE_FIELDS)}")
    engine_kwargs.setdefault("show_progress", False)
    engine = EngineConfig(model=model, tensor_parallel=tensor_parallel, **engine_kwargs)
    name = deployment_name or (Path(model).name if model else "default")
    registry = Path(registry_path) if registry_path is not None else None
    dep = launch(name, engine, replicas=replica_num, host=restful_api_host if enable_restful_api else "127.0.0.1",
                 port=restful_api_port, api_key=api_key, max_queued_requests=max_queued_requests,
                 request_timeout=request_timeout, startup_timeout=startup_timeout,
                 model_names=[model] if model else [], registry_path=registry)
    return MIIClient(dep.url, name, api_key=api_key, registry_path=registry)


def serve(model: str | None = None, deployment_name: str | None = None, *, replica_num: int = 1,
          tensor_parallel: int = 1, **kwargs) -> MIIClient:
    """FastGen's entry point: ``deploy`` under a fresh name unless one is given; returns
    the client (``client.generate(...)``, ``client.terminate_server()``)."""
    if deployment_name is None:
        deployment_name = f"{Path(model).name if model else 'default'}-{secrets.token_hex(3)}"
    return deploy(model, deployment_name, replica_num=replica_num, tensor_parallel=tensor_parallel, **kwargs)


def client(deployment_name: str, registry_path: str | Path | None = None, timeout: float | None = 600.0
           ) -> MIIClient:
    """A client for a running deployment, found by name in the registry."""
    from server import registry

    path = Path(registry_path) if registry_path is not None else None
    entry = registry.lookup(deployment_name, path)
    return MIIClient(entry.url, entry.name, api_key=entry.api_key, timeout=timeout, registry_path=path)


def mii_query_handle(deployment_name: str, registry_path: str | Path | None = None) -> MIIClient:
    """MII's legacy name for ``client``: ``handle.query({"query": [...]}, **kwargs)``."""
    return client(deployment_name, registry_path)


def terminate(deployment_name: str, registry_path: str | Path | None = None) -> None:
    """Stop every process of the deployment and remove it from the registry."""
    from server.launcher import terminate as stop

    stop(deployment_name, Path(registry_path) if registry_path is not None else None)
