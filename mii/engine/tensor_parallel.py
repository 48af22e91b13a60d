"""Tensor parallelism: one process per rank, torch.distributed between them.

Rank 0 is the engine's own process: it schedules, packs each step's inputs and sends
them host to host over a gloo group, so the other ranks never wait on their GPU to
learn the next step and can queue it while the last one runs. When a step feeds input
ids from the last step's tokens (async scheduling), rank 0's tokens follow on the device
group, and every rank feeds them alike.
Every rank then runs the same forward pass on its slice of the weights (the layers'
weight_loaders took only their slices) and its heads of the KV cache. Only rank 0
samples. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import socket

import torch
import torch.distributed as dist

from mii.config import EngineConfig
from mii.model.parallel import TP, set_tensor_parallel
from mii.policies.base import ModelSpec
from .inputs import StepInputs
from .model_runner import ModelRunner
from .prompt_logprobs import PromptRows
from .scheduler import ScheduledSeq

log = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(seconds=120)  # a dead peer fails the step instead of hanging it
_STOP = -1


def check_divisible(spec: ModelSpec, tp: int) -> None:
    """Fail before any process starts when the model cannot be split ``tp`` ways."""
    checks = {"num_attention_heads": spec.num_heads, "intermediate_size": spec.intermediate}
    for name, n in checks.items():
        if n % tp:
            raise ValueError(f"{name}={n} is not divisible by tensor_parallel={tp}")
    kv = spec.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"num_key_value_heads={kv} cannot be split or replicated over tensor_parallel={tp}")


def rank_device(config: EngineConfig, local_rank: int, local_world: int | None = None) -> torch.device:
    device = config.resolved_device()
    if device.type != "cuda":
        return device
    need = local_world or config.tensor_parallel
    if torch.cuda.device_count() < need:
        raise ValueError(f"tensor_parallel={config.tensor_parallel} needs {need} GPUs on this host; "
                         f"{torch.cuda.device_count()} visible")
    return torch.device("cuda", local_rank)


def launcher_env() -> dict[str, int] | None:
    """Ranks handed out by torchrun (or any launcher setting the torch.distributed
    variables): the multi-host path. None when this process was started alone."""
    import os
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            if k in os.environ}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, init_method: str, device: torch.device, peer_memory: bool) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=_TIMEOUT)
    _set_groups(rank, world, device, peer_memory)


def _set_groups(rank: int, world: int, device: torch.device, peer_memory: bool) -> None:
    """The model's group, its gloo twin for step inputs, and, when asked and every rank is
    a GPU of this host, the peer-memory all-reduce (else NCCL does all of it)."""
    cpu = dist.new_group(backend="gloo", timeout=_TIMEOUT) if dist.get_backend() != "gloo" else dist.group.WORLD
    peer = None
    if peer_memory and device.type == "cuda":
        from kernels.allreduce import PeerAllReduce
        try:
            peer = PeerAllReduce.create(dist.group.WORLD, device)
        except (RuntimeError, ValueError) as e:  # no CUDA IPC or P2P between these GPUs (every rank raises alike)
            log.warning("peer-memory all-reduce unavailable, NCCL does all reduces: %s", e)
    set_tensor_parallel(rank, world, dist.group.WORLD, cpu, peer)


class RankFailure(RuntimeError):
    """A tensor-parallel peer is gone: this replica cannot run another step."""

    fatal = True  # tells the engine loop to stop rather than carry on


class TPModelRunner(ModelRunner):
    """A ModelRunner whose every step is mirrored by the other ranks."""

    def _num_blocks(self) -> int:
        n = torch.tensor([super()._num_blocks()], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # every rank must hold the same blocks
        return int(n.item())

    def step_logits(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, PromptRows | None]:
        inputs = self.pack(batch)
        self._check_peers()
        try:
            dist.broadcast(inputs.header(), src=0, group=TP.cpu_group)
            dist.broadcast(inputs.data, src=0, group=TP.cpu_group)
            if inputs.num_fed:  # the peers feed the same ids from rank 0's last tokens
                dist.broadcast(self.last, src=0, group=TP.group)
            return self.forward(inputs, float32=inputs.prompt is None), inputs.prompt
        except RuntimeError as e:  # a collective broke: say which rank, if one died
            self._check_peers()
            raise RankFailure(f"tensor-parallel step failed: {e}") from e

    def serve_forever(self) -> None:
        """Non-zero ranks: run whatever steps rank 0 sends, until told to stop."""
        with torch.inference_mode():
            while True:
                header = torch.empty(5, dtype=torch.long)
                dist.broadcast(header, src=0, group=TP.cpu_group)
                sizes = header.tolist()
                if sizes[0] == _STOP:
                    return
                data = torch.empty(StepInputs.words(sizes), dtype=torch.long)
                dist.broadcast(data, src=0, group=TP.cpu_group)
                inputs = StepInputs.from_wire(sizes, data)
                if inputs.num_fed:  # rank 0's last sampled tokens, to feed the ids it has not seen
                    dist.broadcast(self.last, src=0, group=TP.group)
                self.forward(inputs)  # the same graph-or-eager choice as rank 0

    def dead_peer(self) -> str | None:
        """Why this replica cannot step any more, if a rank it spawned has died (ranks that
        a launcher started are not watched here: their collectives time out instead)."""
        for rank, proc in enumerate(getattr(self, "procs", []), start=1):
            if not proc.is_alive():
                return f"tensor-parallel rank {rank} died (exit code {proc.exitcode}); this replica must be restarted"
        return None

    def _check_peers(self) -> None:
        if (why := self.dead_peer()) is not None:
            raise RankFailure(why)

    def kill_peers(self) -> None:
        """Stop the ranks at once, without the orderly shutdown a wedged GPU could block."""
        for p in getattr(self, "procs", []):
            if p.is_alive():
                p.kill()

    def shutdown(self) -> None:
        procs = getattr(self, "procs", [])
        if TP.rank == 0 and dist.is_initialized() and all(p.is_alive() for p in procs):
            try:
                dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0]), src=0, group=TP.cpu_group)
            except Exception:  # a peer already gone: fall through to terminate
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []
        _leave_group(self)
        set_tensor_parallel(0, 1)


def _leave_group(runner: ModelRunner) -> None:
    # Captured graphs hold NCCL work; destroying the group under them hung on 2x H200
    # (seen 2026-11-22), so drop them first.
    runner.graphs = None
    TP.peer_all_reduce = None
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, config: EngineConfig, spec: ModelSpec, path: str, dtype: torch.dtype,
            init_method: str) -> None:
    device = rank_device(config, rank)
    _init_group(rank, config.tensor_parallel, init_method, device, config.custom_all_reduce)
    runner = TPModelRunner(config.replace(show_progress=False), spec, path, device, dtype, set())
    runner.serve_forever()
    _leave_group(runner)


def join_launched(config: EngineConfig, spec: ModelSpec, path: str, dtype: torch.dtype,
                  eos_token_ids: set[int], env: dict[str, int]) -> TPModelRunner:
    """Under torchrun: every rank runs this; rank 0 returns its runner to the engine,
    the others serve rank 0's batches here and exit when it shuts down."""
    if env["WORLD_SIZE"] != config.tensor_parallel:
        raise ValueError(f"tensor_parallel={config.tensor_parallel} but the launcher started "
                         f"WORLD_SIZE={env['WORLD_SIZE']} ranks")
    device = rank_device(config, env.get("LOCAL_RANK", 0), env.get("LOCAL_WORLD_SIZE", 1))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", timeout=_TIMEOUT)
    # peer memory only when every rank is on this host
    one_host = env.get("LOCAL_WORLD_SIZE", 1) == env["WORLD_SIZE"]
    _set_groups(env["RANK"], env["WORLD_SIZE"], device, config.custom_all_reduce and one_host)
    runner = TPModelRunner(config, spec, path, device, dtype, eos_token_ids)
    if env["RANK"] != 0:
        runner.serve_forever()
        _leave_group(runner)
        raise SystemExit(0)
    return runner


def start_tensor_parallel(config: EngineConfig, spec: ModelSpec, path: str, dtype: torch.dtype,
                          eos_token_ids: set[int]) -> TPModelRunner:
    """Spawn ranks 1..N-1 on this host, join them as rank 0, and return rank 0's runner.
    Under a launcher (torchrun, possibly over several hosts) join its ranks instead."""
    tp = config.tensor_parallel
    check_divisible(spec, tp)
    env = launcher_env()
    if env is not None:
        return join_launched(config, spec, path, dtype, eos_token_ids, env)
    device = rank_device(config, 0)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
    procs = [ctx.Process(target=_worker, args=(r, config, spec, path, dtype, init_method),
                         name=f"mii-tp-rank{r}", daemon=True) for r in range(1, tp)]
    for p in procs:
        p.start()
    try:
        _init_group(0, tp, init_method, device, config.custom_all_reduce)
        runner = TPModelRunner.__new__(TPModelRunner)
        runner.procs = procs
        ModelRunner.__init__(runner, config, spec, path, device, dtype, eos_token_ids)
    except BaseException:
        for p in procs:
            p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        set_tensor_parallel(0, 1)
        raise
    return runner

