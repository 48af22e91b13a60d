"""Issue-7 figures on a 2-GPU machine: TP=2 against TP=1 bs=1 decode latency on one
shape, identical greedy outputs, and the all-reduce time per step.

    python -m benchmarks.tp --model llama-7b --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import ours
from .models import build, rank_shape
from mii.config import SamplingParams


def allreduce_us(hidden: int, layers: int) -> dict:
    """One [1, hidden] all-reduce over 2 GPUs, in its own two processes: launched eagerly,
    and replayed from a CUDA graph holding a step's worth (2 per layer) of them, as the
    engine's decode graphs hold them."""
    import torch.multiprocessing as mp
    port = 29500 + os.getpid() % 1000
    q = mp.get_context("spawn").SimpleQueue()
    procs = [mp.get_context("spawn").Process(target=_ar_worker, args=(r, port, hidden, 2 * layers, q))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return q.get()


def _ar_worker(rank: int, port: int, hidden: int, per_step: int, q) -> None:
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.randn(1, hidden, device="cuda", dtype=torch.float16)
    eager = 1e6 * ours.seconds_per_call(lambda: dist.all_reduce(x), warmup=20, iters=200)
    res = {"eager_us": eager, "graphed_us": _graphed_us(lambda: dist.all_reduce(x), per_step)}
    try:
        from kernels.allreduce import PeerAllReduce
        peer = PeerAllReduce.create(dist.group.WORLD, torch.device("cuda", rank))
        res["peer_graphed_us"] = _graphed_us(lambda: peer(x), per_step)
        # what follows a row-parallel linear in a block: all-reduce, residual add and RMSNorm,
        # as two kernels (peer all-reduce, then add_norm) and as the fused one
        from kernels.norm import add_norm
        r, w = torch.randn_like(x), torch.rand(hidden, device="cuda", dtype=torch.float16)
        res["peer_then_norm_graphed_us"] = _graphed_us(lambda: add_norm(peer(x), r, w, None, 1e-5, True), per_step)
        res["fused_norm_graphed_us"] = _graphed_us(lambda: peer.add_norm(x, None, r, w, None, 1e-5, True), per_step)
    except (RuntimeError, ValueError) as e:
        res["peer_error"] = str(e)
    if rank == 0:
        q.put(res)
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()


def _graphed_us(fn, per_step: int) -> float:
    """us per call, replayed from a CUDA graph holding a decode step's worth of calls."""
    fn()  # compile (Triton) and connect (NCCL) outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            for _ in range(per_step):
                fn()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (20 * per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--quantize", default=None, help="a quantization mode for both engines (w8a16, w4a16, w8a8)")
    ap.add_argument("--skip-allreduce", action="store_true", help="do not time the all-reduce on its own")
    ap.add_argument("--watchdog", type=float, default=0, help="dump all stacks and exit after this many seconds")
    ap.add_argument("--profile", action="store_true", help="also break rank 0's decode step into kernels")
    ap.add_argument("--rank-alone", action="store_true",
                    help="also time one TP=2 rank's share of the model on one GPU, without all-reduces")
    ap.add_argument("--allreduce-only", type=Path, default=None,
                    help="keep this earlier result's engine figures; measure the all-reduce again")
    args = ap.parse_args()
    if args.watchdog:
        import faulthandler
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
    res = {"model": args.model, "quantize": args.quantize,
           "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}",
           "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if args.allreduce_only is not None:
        res = json.loads(args.allreduce_only.read_text())
    else:
        _engines(args, res, say)
    if args.rank_alone:
        res["rank_alone"] = _rank_alone(args, say)
        res["rank_alone"]["ratio_to_tp1"] = res["rank_alone"]["bs1_ms_per_step"] / res["tp1"]["bs1_ms_per_step"]
        _save(args, res)
    from .models import SHAPES
    kw = SHAPES[args.model][1]
    hidden, layers = kw.get("hidden_size"), kw.get("num_hidden_layers")
    if not args.skip_allreduce:
        ar = allreduce_us(hidden, layers)
        res["allreduce_eager_us"] = ar["eager_us"]
        res["allreduce_nccl_us"] = ar["graphed_us"]
        # as the engine's decode graphs run them: the peer-memory kernel where it was set up
        res["allreduce_us"] = ar.get("peer_graphed_us", ar["graphed_us"])
        res["allreduce_kind"] = "peer memory" if "peer_graphed_us" in ar else "NCCL"
        for k in ("peer_then_norm_graphed_us", "fused_norm_graphed_us"):
            if k in ar:
                res[k.replace("_graphed", "")] = ar[k]
        res["allreduce_per_step_ms"] = 2 * layers * res["allreduce_us"] / 1e3  # attention output and MLP down
    # Measured inside the engine's step: includes waiting for the slower rank. The fused kernels
    # (all-reduce, residual add and norm in one) count whole: an upper bound. Not where TP=2
    # folds: its exchanges run inside the GEMVs (the rank alone, --rank-alone, bounds them then).
    if "tp2_profile" in res and not res["tp2"].get("folds"):
        kernels = res["tp2_profile"]["kernels"]
        res["allreduce_per_step_ms"] = sum(kernels.get(k, {"us": 0})["us"]
                                           for k in ("all-reduce", "all-reduce+norm")) / 1e3
    if "allreduce_per_step_ms" in res:
        res["allreduce_fraction"] = res["allreduce_per_step_ms"] / res["tp2"]["bs1_ms_per_step"]
    _save(args, res)
    print(json.dumps(res))


def _engines(args, res: dict, say) -> None:
    """TP=1 then TP=2 on the same checkpoint: bs=1 latency, greedy outputs, first-token logprobs."""
    with tempfile.TemporaryDirectory() as tmp:
        path, model = build(args.model, Path(tmp))
        del model
        torch.cuda.empty_cache()
        prompts = [[(7 * i + 3 * j) % 30000 + 3 for j in range(64)] for i in range(4)]
        greedy = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
        tokens, top5 = {}, {}
        say("model built")
        first_lp = SamplingParams(max_new_tokens=1, temperature=0, logprobs=5)
        if args.quantize:  # how far each quantized run is from fp16, to judge TP=2 against TP=1
            eng, _ = ours.make_engine(path, enable_cuda_graph=False)
            top5["fp16"] = [dict(o.logprobs[0].top) for o in eng.generate(prompts, first_lp)]
            eng.shutdown()
            del eng
            torch.cuda.empty_cache()
        # TP=1; TP=2 with NCCL alone; TP=2 with its norms unfolded (an all-reduce-and-norm
        # kernel after each row-parallel GEMV, as before the ranks could fold); TP=2 as shipped;
        # and, when TP=1 folds and TP=2 does not, TP=1 unfolded: the arithmetic TP=2 reproduces.
        runs = [("tp1", 1, True, True), ("tp2_nccl", 2, False, True), ("tp2_unfolded", 2, True, False),
                ("tp2", 2, True, True), ("tp1_unfolded", 1, True, False)]
        for name, tp, peer, fold in runs:
            if name == "tp1_unfolded" and not (res["tp1"]["folds"] and not res["tp2"]["folds"]):
                continue
            eng, startup = ours.make_engine(path, tensor_parallel=tp, enable_cuda_graph=not args.no_cuda_graph,
                                            custom_all_reduce=peer, quantize=args.quantize, fold_norms=fold)
            say(f"{name} engine ready in {startup:.1f}s")
            ours.decode(eng, 1, new_tokens=16)
            d = ours.decode(eng, 1)
            res[name] = {"startup_s": startup, "bs1_ms_per_step": d["ms_per_step"], "bs1_tok_s": d["tok_s"],
                         "graphs": eng.runner.graphs is not None, "folds": eng.runner.model.fold_norms}
            say(f"{name}: {d['ms_per_step']:.3f} ms/step")
            if name in ("tp1", "tp2", "tp1_unfolded"):
                if args.profile and name != "tp1_unfolded":
                    res[f"{name}_profile"] = _profile(eng)
                tokens[name] = [o.token_ids for o in eng.generate(prompts, greedy)]
                top5[name] = [dict(o.logprobs[0].top) for o in eng.generate(prompts, first_lp)]
            _save(args, res)  # so that a hang at shutdown loses nothing
            eng.shutdown()
            del eng
            torch.cuda.empty_cache()
        res["latency_ratio"] = res["tp2"]["bs1_ms_per_step"] / res["tp1"]["bs1_ms_per_step"]
        res["unfolded_latency_ratio"] = res["tp2_unfolded"]["bs1_ms_per_step"] / res["tp1"]["bs1_ms_per_step"]
        ref = "tp1_unfolded" if "tp1_unfolded" in tokens else "tp1"  # TP=1 in TP=2's arithmetic
        res["outputs_reference"] = "TP=1 without the norm fold" if ref != "tp1" else "TP=1"
        res["identical_outputs"] = tokens[ref] == tokens["tp2"]
        res["first_token_agreement"] = sum(a[:8] == b[:8] for a, b in zip(tokens[ref], tokens["tp2"])) / len(prompts)
        # the first generated token alone (first_token_agreement above compares the first 8)
        res["one_token_agreement"] = sum(a[:1] == b[:1] for a, b in zip(tokens[ref], tokens["tp2"])) / len(prompts)
        # how far TP=2's first-token log-probabilities are from the reference's (shared top-5 ids)
        res["max_logprob_diff"] = _max_diff(top5[ref], top5["tp2"])
        if "fp16" in top5:
            res["max_logprob_diff_vs_fp16"] = {k: _max_diff(top5["fp16"], top5[k]) for k in ("tp1", "tp2")}


def _rank_alone(args, say) -> dict:
    """bs=1 decode of one TP=2 rank's share of the model (``models.rank_shape``) on one GPU:
    the rank's GEMVs, attention and norms with no all-reduce and no logits gather. TP=2's
    step minus this is what the exchanges cost inside the step, waits included."""
    shape = rank_shape(args.model, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path, model = build(shape, Path(tmp))
        del model
        torch.cuda.empty_cache()
        eng, startup = ours.make_engine(path, enable_cuda_graph=not args.no_cuda_graph, quantize=args.quantize)
        ours.decode(eng, 1, new_tokens=16)
        d = ours.decode(eng, 1)
        out = {"shape": shape, "bs1_ms_per_step": d["ms_per_step"]}
        if args.profile:
            out["profile"] = _profile(eng)
        say(f"one rank's share alone: {d['ms_per_step']:.2f} ms/step")
        eng.shutdown()
        del eng
        torch.cuda.empty_cache()
    return out


def _max_diff(xs: list[dict], ys: list[dict]) -> float:
    return max(abs(a[t] - b[t]) for a, b in zip(xs, ys) for t in a if t in b)


def _profile(eng, steps: int = 32) -> dict:
    """Rank 0's GPU kernels over `steps` bs=1 decode steps (graph replays included), per step."""
    from .profile_step import _by_kind
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        d = ours.decode(eng, 1, new_tokens=steps + 1)
    kinds = {k: {"count": v["count"] / steps, "us": v["us"] / steps} for k, v in _by_kind(prof).items()}
    return {"ms_per_step": d["ms_per_step"], "kernel_ms_per_step": sum(v["us"] for v in kinds.values()) / 1e3,
            "kernels": kinds}


def _save(args, res: dict) -> None:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mode = f"-{args.quantize}" if args.quantize else ""
    (Path(args.out) / f"tp-{args.model}{mode}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
