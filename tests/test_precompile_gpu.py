"""Triton kernels compiled in parallel before CUDA-graph capture (mii/engine/precompile.py)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs

from mii.engine.precompile import precompile

pytestmark = pytest.mark.gpu


@triton.jit
def _scale_kernel(x_ptr, y_ptr, a, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * a, mask=i < n)


def test_deferred_launches_compile_once_and_run_later():
    compiled = []
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
    try:
        x = torch.randn(1000, device="cuda")
        ys = [torch.zeros_like(x) for _ in range(3)]
        launch = [lambda y=y, b=b: _scale_kernel[(triton.cdiv(1000, b),)](x, y, 2.0, 1000, BLOCK=b)
                  for y, b in zip(ys, (128, 256, 128))]
        assert precompile(launch, 2) == 2  # two block sizes: two specializations, the repeat dropped
        torch.cuda.synchronize()
        assert all(int(y.count_nonzero()) == 0 for y in ys)  # deferred: nothing ran
        assert sorted(compiled) == ["_scale_kernel", "_scale_kernel"]
        for run in launch:
            run()
        assert len(compiled) == 2  # the real launches found them compiled
        for y in ys:
            torch.testing.assert_close(y, x * 2.0)
    finally:
        knobs.runtime.jit_post_compile_hook = None


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        precompile([], 0)


ENGINE = textwrap.dedent("""
    import json, sys
    from triton import knobs
    from mii.config import EngineConfig, SamplingParams
    from mii.engine import cuda_graph, model_runner
    from mii.engine.engine import LLMEngine

    compiled, marks = [], {}
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
    capture = cuda_graph.StepGraphs.capture
    def timed_capture(self):
        marks["capture"] = len(compiled)
        capture(self)
        marks["captured"] = len(compiled)
    cuda_graph.StepGraphs.capture = timed_capture

    def run(threads):
        model_runner.COMPILE_THREADS = threads
        eng = LLMEngine(EngineConfig(model=sys.argv[1], device="cuda", dtype="fp16", show_progress=False))
        marks["ready"] = len(compiled)
        prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13]]
        outs = eng.generate(prompts, [SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True),
                                      SamplingParams(max_new_tokens=12, temperature=0.8, seed=3, ignore_eos=True)])
        marks["served"] = len(compiled)
        return [o.token_ids for o in outs]

    parallel = run(8)
    first = dict(marks)
    serial = run(0)  # every kernel already in memory: the reference path, one by one
    print(json.dumps(dict(first=first, parallel=parallel, serial=serial)))
""")


def test_engine_compiles_everything_before_capture(tiny_model_dir, tmp_path):
    """On an empty Triton cache, capture and the first requests (greedy and sampled) compile
    nothing: the precompile took every kernel. The tokens are the ones the engine gives
    without it."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    out = subprocess.run([sys.executable, "-c", ENGINE, str(tiny_model_dir("LlamaForCausalLM"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    marks = res["first"]
    assert marks["capture"] > 10  # the graphs' kernels, compiled before capture
    assert marks["captured"] == marks["capture"] == marks["ready"] == marks["served"]
    assert res["parallel"] == res["serial"]
