"""The serving stack around the engine.

    launcher.py   start a deployment's processes, wait for health, tear down (no orphans)
    worker.py     one engine replica behind the gRPC service of protos/mii.proto
    gateway.py    FastAPI app: config, auth, admission (429), /health, /metrics, /openapi.json
    legacy.py     POST /mii/{deployment}, MII's request shape
    openai_api.py /v1/models, /v1/completions, /v1/chat/completions (+ openai_schemas.py)
    replicas.py   the gateway's replica pool: least outstanding requests, retries, dead replicas
    streams.py    merging choice streams, SSE, client-disconnect handling
    wire.py       Python values <-> proto messages;  errors.py: the HTTP error envelope
    metrics.py    Prometheus metrics;  registry.py: deployments by name, per user
    client.py     the Python handle (MII legacy query + FastGen generate);  demo.py: `make demo`
"""
