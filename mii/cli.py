"""The ``mii`` command.

    mii serve [MODEL] --replicas 2 --tensor-parallel 1 --port 8000 --api-key KEY   # until Ctrl-C
    mii query NAME "DeepSpeed is" "Seattle is" --max-tokens 32 [--stream]
    mii quantize MODEL OUT --mode w8a16 [--group-size 128] [--calibrate/--no-calibrate] [--eval]
    mii list
    mii terminate NAME
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    from mii.api import deploy
    from server.launcher import owned

    engine = {k: v for k, v in dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                                     num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
                                     quantize=args.quantize).items()
              if v is not None}
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False
    name = args.name or (Path(args.model).name if args.model else "default")
    # SIGTERM (docker stop, kill) shuts down as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        client = deploy(args.model, name, tensor_parallel=args.tensor_parallel, replica_num=args.replicas,
                        restful_api_host=args.host, restful_api_port=args.port, api_key=args.api_key,
                        max_queued_requests=args.max_queued_requests, request_timeout=args.request_timeout,
                        startup_timeout=args.startup_timeout, registry_path=args.registry, **engine)
        dep = owned(name)
        print(f"mii: deployment {name!r} serving on {client.url} "
              f"(OpenAI: {client.url}/v1, legacy: {client.url}/mii/{name}); Ctrl-C stops it", flush=True)
        while dep.gateway.popen.poll() is None:
            time.sleep(0.5)
        print(f"mii: the gateway exited (code {dep.gateway.popen.returncode}); last lines of its log:\n"
              f"{dep.gateway.tail()}", file=sys.stderr)
        dep.terminate()
        return 1
    except KeyboardInterrupt:
        dep = owned(name)
        if dep is not None:
            print("mii: shutting down", flush=True)
            dep.terminate()
        return 0


def _query(args: argparse.Namespace) -> int:
    from mii.api import client
    from server.client import MIIClient

    c = MIIClient(args.url, args.name, api_key=args.api_key) if args.url else client(args.name, args.registry)
    kwargs = {"max_new_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        if args.stream:
            for prompt in args.prompts:
                for piece in c.stream(prompt, **kwargs):
                    print(piece, end="", flush=True)
                print()
        else:
            for text in c.query({"query": args.prompts}, **kwargs).response:
                print(text)
    finally:
        c.close()
    return 0


def _list(args: argparse.Namespace) -> int:
    from server import registry

    for e in registry.entries(args.registry):
        print(f"{e.name}\t{e.url}\t{len(e.workers)} replica(s)\t{e.model or 'default model'}\towner pid {e.owner_pid}")
    return 0


def _terminate(args: argparse.Namespace) -> int:
    from mii.api import terminate

    terminate(args.name, args.registry)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mii", description="Serve language models (MII-style).")
    sub = ap.add_subparsers(dest="command", required=True)
    registry = dict(type=Path, default=None, help="registry file (default ~/.cache/mii-serve/deployments.json)")

    s = sub.add_parser("serve", help="deploy a model and serve it until interrupted")
    s.add_argument("model", nargs="?", default=None, help="HF directory, .gguf file or hub id (default: embedded)")
    s.add_argument("--name", default=None, help="deployment name (default: the model's directory name)")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--tensor-parallel", type=int, default=1)
    s.add_argument("--host", default="127.0.0.1", help="gateway address (0.0.0.0 to expose it)")
    s.add_argument("--port", type=int, default=8000, help="gateway port (0 = any free port)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    s.add_argument("--device", default=None)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--num-kv-blocks", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=None)
    s.add_argument("--quantize", default=None, choices=["w8a16", "w8a8", "w4a16"],
                   help="quantize on the fly at load, round-to-nearest (`mii quantize` writes calibrated checkpoints)")
    s.add_argument("--no-prefix-caching", action="store_true", help="compute every prompt in full")
    s.add_argument("--max-queued-requests", type=int, default=1024)
    s.add_argument("--request-timeout", type=float, default=600.0)
    s.add_argument("--startup-timeout", type=float, default=600.0)
    s.add_argument("--registry", **registry)
    s.set_defaults(func=_serve)

    q = sub.add_parser("query", help="generate with a running deployment")
    q.add_argument("name", help="deployment name")
    q.add_argument("prompts", nargs="+")
    q.add_argument("--max-tokens", type=int, default=64)
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--stream", action="store_true")
    q.add_argument("--url", default=None, help="gateway URL, instead of looking the name up")
    q.add_argument("--api-key", default=None)
    q.add_argument("--registry", **registry)
    q.set_defaults(func=_query)

    ls = sub.add_parser("list", help="running deployments")
    ls.add_argument("--registry", **registry)
    ls.set_defaults(func=_list)

    from mii.quantize import DESCRIPTION, add_arguments, run
    qz = sub.add_parser("quantize", help="write a quantized checkpoint (ZeroQuant-style)", description=DESCRIPTION)
    add_arguments(qz)
    qz.set_defaults(func=run)

    t = sub.add_parser("terminate", help="stop a deployment")
    t.add_argument("name")
    t.add_argument("--registry", **registry)
    t.set_defaults(func=_terminate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        print(f"mii: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
