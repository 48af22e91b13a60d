"""The per-request token stream that the serving layer builds on."""
import asyncio
import threading

import pytest

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from mii.engine.stream import EngineLoop

P = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def loop(tiny_model_dir):
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir("GPTNeoXForCausalLM")), device="cpu", show_progress=False))
    ref = eng.generate(["Hello, my name is"], P)[0]  # before the loop thread owns the engine
    lp = EngineLoop(eng)
    lp.ref = ref
    yield lp
    lp.shutdown()


def test_sync_stream_yields_per_token_outputs_matching_generate(loop):
    ref = loop.ref
    outs = list(loop.submit("Hello, my name is", P))
    assert [t for o in outs for t in o.token_ids] == ref.token_ids
    assert all(len(o.token_ids) == 1 for o in outs)
    assert "".join(o.text for o in outs) == ref.generated_text
    assert outs[-1].finished and outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])


def test_async_streams_run_concurrently_and_cancel_frees_kv(loop):
    async def main():
        full = [o async for o in loop.submit("DeepSpeed is", P)]
        streams = [loop.submit(p, P) for p in ("a", "fox", "The lazy dog")]
        results = await asyncio.gather(*[_collect(s) for s in streams])
        assert all(len(r) == 20 for r in results)
        # walk away from a stream after two tokens: the engine must abort it
        s = loop.submit("Seattle is", SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))
        async for i, _ in _enumerate(s):
            if i == 1:
                break
        for _ in range(100):
            await asyncio.sleep(0.05)
            if loop.engine.stats["kv_blocks_free"] == loop.engine.stats["kv_blocks_total"]:
                break
        return full

    full = asyncio.run(main())
    assert len(full) == 20
    assert loop.engine.stats["kv_blocks_free"] == loop.engine.stats["kv_blocks_total"]
    assert loop.engine.stats["num_running"] == 0


def test_invalid_prompt_raises_in_the_caller(loop):
    with pytest.raises(ValueError, match="max_model_len"):
        loop.submit([5] * 10_000, P)


async def _collect(stream):
    return [o async for o in stream]


async def _enumerate(stream):
    i = 0
    async for o in stream:
        yield i, o
        i += 1


def test_a_fault_outside_the_step_fails_requests_instead_of_stranding_them(tiny_model_dir):
    """An exception on the loop thread outside engine.step() (here injected into abort) marks
    the loop failed and ends every waiting stream with an error; nothing hangs."""
    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir("GPTNeoXForCausalLM")), device="cpu", show_progress=False))
    lp = EngineLoop(eng)
    try:
        def broken_abort(request_id):
            raise KeyError(request_id)

        eng.abort = broken_abort
        waiting = lp.submit("Hello", SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True))
        next(iter(waiting))  # running
        lp.abort(waiting.request_id)
        errors = []
        reader = threading.Thread(target=lambda: _expect_error(waiting, errors), daemon=True)
        reader.start()
        reader.join(timeout=60)  # a regression fails here instead of hanging the suite
        assert not reader.is_alive(), "the stream is still waiting"
        assert len(errors) == 1 and "engine is down" in str(errors[0]), errors
        assert isinstance(lp.failed, KeyError)
        with pytest.raises(RuntimeError, match="engine is down"):
            lp.submit("Hello", P)
    finally:
        lp.shutdown()


def _expect_error(stream, errors: list) -> None:
    try:
        list(stream)
    except RuntimeError as e:
        errors.append(e)
