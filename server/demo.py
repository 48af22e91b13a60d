"""``make demo``: the whole serving stack on the embedded default model, on CPU, offline.

Deploys SmolLM2-135M-Instruct (one worker process + the gateway), asks one question over
REST (OpenAI chat route) and one over gRPC (straight to the worker), prints both answers,
and shuts everything down.

    python -m server.demo [--replicas N]
"""
from __future__ import annotations

import argparse
import time

import grpc
import httpx

from mii.api import serve
from protos import mii_pb2 as pb
from protos import mii_pb2_grpc as pb_grpc
from server.launcher import owned
from server.wire import prompt_to_proto, sampling_to_proto


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    start = time.monotonic()
    print("demo: deploying the embedded default model (SmolLM2-135M-Instruct) on CPU ...", flush=True)
    client = serve(None, replica_num=args.replicas, device="cpu")
    dep = owned(client.deployment)
    print(f"demo: deployment {client.deployment!r} is up in {time.monotonic() - start:.1f}s: gateway {client.url}, "
          f"workers {', '.join(dep.worker_addresses)}\n", flush=True)
    try:
        question = "What is the capital of France?"
        r = httpx.post(f"{client.url}/v1/chat/completions", timeout=300, json={
            "model": client.deployment, "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        print(f"REST  POST /v1/chat/completions  {question!r}\n   -> {body['choices'][0]['message']['content']!r}"
              f"  ({body['usage']['completion_tokens']} tokens)\n", flush=True)

        prompt = "DeepSpeed is"
        with grpc.insecure_channel(dep.worker_addresses[0]) as channel:
            reply = pb_grpc.WorkerStub(channel).Generate(pb.GenerateRequest(
                prompts=[prompt_to_proto(prompt)], params=sampling_to_proto(max_new_tokens=args.max_tokens,
                                                                            temperature=0)), timeout=300)
        done = reply.completions[0]
        print(f"gRPC  mii.Worker/Generate  {prompt!r}\n   -> {done.text!r}  ({done.generated_tokens} tokens, "
              f"replica {reply.replica_id})\n", flush=True)
    finally:
        client.terminate_server()
    print(f"demo: shut down cleanly; {time.monotonic() - start:.1f}s in all", flush=True)


if __name__ == "__main__":
    main()
