import os
from types import SimpleNamespace

import torch

# Kernels run in Triton's interpreter on CPU; this must be set before any
# @triton.jit decorator runs, i.e. before anything imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

import pytest  # noqa: E402

from tests.tiny_models import ARCHITECTURES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> path of a saved random tiny model of that architecture."""
    root = tmp_path_factory.mktemp("tiny-models")

    def make(arch: str = "LlamaForCausalLM"):
        return make_tiny_model(arch, root / arch)

    return make


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model (SmolLM2-135M-Instruct), converted once to the cache."""
    from mii.model.source import resolve_model_path
    return resolve_model_path(None, show_progress=False)


@pytest.fixture(scope="session")
def dep(tiny_model_dir, tmp_path_factory):
    """One real deployment (2 worker processes + gateway on 127.0.0.1, tiny Llama) shared by
    the test_server_api_* modules: one start, not one per module. It stays up until the
    session ends. Other tests' deployments have their own names, registry files and free
    ports, and process checks count only the children added since they began. Tests leave
    it idle (nothing in flight), as the next may count running and aborted requests."""
    import httpx  # here, not above: most sessions never start a server

    from mii import api
    from server.launcher import owned
    from tests.server_helpers import NAME

    model = str(tiny_model_dir("LlamaForCausalLM"))
    registry = tmp_path_factory.mktemp("registry") / "deployments.json"
    client = api.deploy(model, NAME, replica_num=2, num_kv_blocks=256, registry_path=registry,
                        startup_timeout=180)
    http = httpx.Client(base_url=client.url, timeout=60)
    yield SimpleNamespace(client=client, model=model, registry=registry, url=client.url, http=http,
                          workers=owned(NAME).worker_addresses)
    http.close()
    api.terminate(NAME, registry_path=registry)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the device machine)")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)
