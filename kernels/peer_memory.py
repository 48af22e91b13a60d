"""One device buffer per rank, mapped into every other rank's address space (CUDA IPC).

The peer-memory all-reduce (allreduce.py) needs each rank's buffer and flags at this
process's addresses. torch's symmetric memory did this, but its rendezvous (torch 2.11)
names its store keys by how many rendezvous *this process* has made (pytorch issue
196082): a process that builds a second tensor-parallel engine (a test session, a
notebook) is ahead of its freshly spawned peers, and both sides wait for keys the other
never writes until the store times out, then fall back to NCCL. On 2x H200 (2026-11-24)
four TP=2 engines built one after another in one process took about 9 minutes where
they take 2 once this was replaced. Here the
handles travel by ``all_gather_object`` on the group itself, so there is no count to
drift, and every rank learns whether every other one succeeded, so they all make the
same choice.

The calls go straight to the CUDA runtime that torch has loaded, through ctypes, as
vLLM's custom all-reduce does: opening a handle maps the peer's memory into this rank's
own context (peer access enabled lazily), where torch's tensor sharing would open a
context on the peer's GPU in every process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import weakref

import torch
import torch.distributed as dist

_LAZY_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_byte * 64)]  # cudaIpcMemHandle_t


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime this process already runs (torch loaded it), else the system's."""
    torch.cuda.init()
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcudart" in line.split()[-1]}
    path = min(paths) if paths else ctypes.util.find_library("cudart")
    if path is None:
        raise RuntimeError("no CUDA runtime library found for peer memory")
    lib = ctypes.CDLL(path)
    for name, args in (("cudaMalloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]),
                       ("cudaMemset", [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]),
                       ("cudaFree", [ctypes.c_void_p]),
                       ("cudaIpcGetMemHandle", [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]),
                       ("cudaIpcOpenMemHandle", [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]),
                       ("cudaIpcCloseMemHandle", [ctypes.c_void_p]),
                       ("cudaDeviceSynchronize", []),
                       ("cudaGetErrorString", [ctypes.c_int])):
        getattr(lib, name).argtypes = args
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what} failed: {lib.cudaGetErrorString(err).decode()} (cudaError {err})")


def _agree(group, ok: bool, payload, what: str) -> list:
    """All-gather (ok, payload) over the group; raise on every rank if any rank failed."""
    got = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, (ok, payload), group=group)
    failed = [f"rank {r}: {p}" for r, (k, p) in enumerate(got) if not k]
    if failed:
        raise RuntimeError(f"{what} failed on " + "; ".join(failed))
    return [p for _, p in got]


def _release(lib: ctypes.CDLL, own: int, opened: list[int]) -> None:
    try:
        for p in opened:
            lib.cudaIpcCloseMemHandle(ctypes.c_void_p(p))
        if own:
            lib.cudaFree(ctypes.c_void_p(own))
    except Exception:  # at interpreter exit the runtime may already be gone
        pass


class PeerMemory:
    """``nbytes`` of zeroed device memory on each rank of ``group`` (this process's GPU
    ``device``); ``ptrs[r]`` is rank r's buffer at this process's address. Collective:
    every rank calls it, and every rank raises if any rank cannot share or map."""

    def __init__(self, nbytes: int, group, device: torch.device):
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        rank = dist.get_rank(group)
        lib, own, opened = None, 0, []
        ok, payload = True, None
        try:
            lib = _cudart()
            with torch.cuda.device(device):
                ptr = ctypes.c_void_p()
                _check(lib, lib.cudaMalloc(ctypes.byref(ptr), nbytes), "cudaMalloc")
                own = ptr.value
                _check(lib, lib.cudaMemset(ptr, 0, nbytes), "cudaMemset")
                _check(lib, lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
                handle = _IpcHandle()
                _check(lib, lib.cudaIpcGetMemHandle(ctypes.byref(handle), ptr), "cudaIpcGetMemHandle")
                payload = bytes(handle)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            ok, payload = False, str(e)
        try:
            handles = _agree(group, ok, payload, "sharing peer memory")
            ok, payload = True, None
            ptrs = []
            try:
                with torch.cuda.device(device):
                    for r, h in enumerate(handles):
                        if r == rank:
                            ptrs.append(own)
                            continue
                        p = ctypes.c_void_p()
                        _check(lib, lib.cudaIpcOpenMemHandle(ctypes.byref(p), _IpcHandle.from_buffer_copy(h),
                                                             _LAZY_PEER_ACCESS), f"opening rank {r}'s memory")
                        opened.append(p.value)
                        ptrs.append(p.value)
            except Exception as e:  # noqa: BLE001
                ok, payload = False, str(e)
            _agree(group, ok, payload, "mapping peer memory")
        except BaseException:
            if lib is not None:
                _release(lib, own, opened)
            raise
        self.ptrs = ptrs
        # unmapped and freed with this object; the peers stop using it first (the
        # engine shuts its ranks down before dropping it)
        self._finalizer = weakref.finalize(self, _release, lib, own, opened)

    def close(self) -> None:
        self._finalizer()
