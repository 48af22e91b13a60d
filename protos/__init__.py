"""Python code for ``protos/mii.proto``, generated with grpc_tools.protoc on first import.

The generated modules (``mii_pb2.py``, ``mii_pb2_grpc.py``) are never committed: they are
rebuilt here whenever they are missing or older than the .proto. Several processes may
import this at once (a deployment starts its workers together), so each builds into a
private directory and moves the files into place atomically; racing builders write the
same bytes. If the package directory is read-only (an installed wheel), the code goes to
a per-user cache directory that is added to this package's search path.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
PROTO = _HERE / "mii.proto"
_NAMES = ("mii_pb2.py", "mii_pb2_grpc.py", "mii_pb2.pyi")


def _fresh(out_dir: Path) -> bool:
    newest_input = PROTO.stat().st_mtime
    return all((out_dir / n).is_file() and (out_dir / n).stat().st_mtime >= newest_input for n in _NAMES)


def build(out_dir: Path = _HERE, force: bool = False) -> Path:
    """Generate the Python modules for mii.proto into ``out_dir`` unless they are fresh."""
    if not force and _fresh(out_dir):
        return out_dir
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".protoc-") as tmp:
        # -I the parent, so the generated stub imports `from protos import mii_pb2`.
        args = ["protoc", f"-I{_HERE.parent}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        for name in _NAMES:
            os.replace(Path(tmp) / _HERE.name / name, out_dir / name)
    return out_dir


def _build_somewhere() -> None:
    if os.access(_HERE, os.W_OK):
        build(_HERE)
        return
    tag = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:12]
    cache = Path.home() / ".cache" / "mii-serve" / "protos" / tag
    build(cache)
    __path__.append(str(cache))  # noqa: F821 -- the package's own search path


_build_somewhere()

from . import mii_pb2, mii_pb2_grpc  # noqa: E402

__all__ = ["mii_pb2", "mii_pb2_grpc", "build", "PROTO"]
