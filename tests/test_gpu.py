"""CUDA path of the engine: fp16/bf16 parity with transformers on the device machine."""
import pytest
import torch
import transformers

from mii.config import EngineConfig, SamplingParams
from mii.engine.engine import LLMEngine
from tests.tiny_models import ARCHITECTURES

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_logits_match_transformers(arch, dtype, tiny_model_dir):
    path = tiny_model_dir(arch)
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype=dtype, show_progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompt = eng.tokenizer.encode("DeepSpeed is a deep learning library for")
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True))
    seq = eng.seqs[rid]
    tol = 2e-2 if dtype == torch.float16 else 6e-2  # half-precision weights against an fp32 reference
    for _ in range(9):
        batch = eng.scheduler.schedule()
        ours = eng.runner.logits(batch)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids], device="cuda")).logits[0, -1].float()
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= tol
        eng.postprocess(batch, [int(ref.argmax())], [None])


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel", "BloomForCausalLM"])
def test_cuda_greedy_batch_tracks_transformers(arch, tiny_model_dir):
    """Batched greedy generation on CUDA (Triton kernels, CUDA graphs) against HF in fp16.
    The real default model cannot travel to the device machine (93 MB > its 64 MiB limit)."""
    path = tiny_model_dir(arch)
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="fp16", show_progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
    prompts = ["Hello, my name is", "DeepSpeed is", "The quick brown fox jumps over the lazy dog.", "a"]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0))
    agree = 0
    for p, o in zip(prompts, outs):
        ids = torch.tensor([eng.tokenizer.encode(p)], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        # fp16 rounding may flip a near-tie late in a sequence; the first tokens must agree
        assert o.token_ids[:4] == ref[:4], p
        agree += sum(a == b for a, b in zip(o.token_ids, ref))
    assert agree >= 0.75 * 24 * len(prompts)


def test_mixed_step_graphs_match_eager(tiny_model_dir):
    """Chunked prefills mixed with decodes replay the mixed-step graphs (padded tokens
    and sequences) and give the eager forward's logits, step by step on the same inputs."""
    path = tiny_model_dir("LlamaForCausalLM")
    kw = dict(model=str(path), device="cuda", dtype="fp16", show_progress=False, max_num_batched_tokens=64,
              max_num_seqs=8, async_scheduling=False)
    graphed, eager = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(**kw, enable_cuda_graph=False))
    used = []
    run = graphed.runner.graphs.run
    graphed.runner.graphs.run = lambda key, *a: used.append(key) or run(key, *a)
    words = "DeepSpeed is a deep learning library that makes distributed training easy and fast".split()
    prompts = [" ".join(words[: 3 + 5 * i] * (1 + i)) for i in range(6)]
    for eng in (graphed, eager):
        for p in prompts:
            eng.add_request(p, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    while eager.has_unfinished():
        bg, be = graphed.scheduler.schedule(), eager.scheduler.schedule()
        assert [b.num_tokens for b in bg] == [b.num_tokens for b in be]
        lg, le = graphed.runner.logits(bg), eager.runner.logits(be)
        assert ((lg - le).abs().max() / le.abs().max()).item() <= 1e-2
        toks = le.argmax(-1).tolist()
        graphed.postprocess(bg, toks, [None] * len(toks))
        eager.postprocess(be, toks, [None] * len(toks))
    kinds = {k for k, _ in used}
    assert kinds == {"mixed", "decode"}, f"graphs replayed: {used}"


def test_greedy_decode_takes_its_tokens_from_the_graph(tiny_model_dir):
    """Greedy decode steps take the argmax captured in the decode graph, which equals
    torch's argmax of the step's logits; a penalized row's step runs the argmax again on
    its adjusted logits. The sampler's own argmax runs only for prefill steps there."""
    path = tiny_model_dir("LlamaForCausalLM")
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="fp16", show_progress=False))
    sampler = eng.runner.sampler
    seen, argmax_calls = [], []
    sample, argmax = sampler.sample, sampler.argmax_fn

    def checked(logits, seqs, greedy=None):
        seen.append((logits.argmax(-1), greedy.clone() if greedy is not None else None))
        return sample(logits, seqs, greedy)
    sampler.sample = checked
    sampler.argmax_fn = lambda x: argmax_calls.append(x.shape[0]) or argmax(x)
    prompts = ["Hello, my name is", "DeepSpeed is", "The quick brown fox"]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    from_graph = [(ref, g) for ref, g in seen if g is not None]
    assert len(from_graph) >= 10 and all(torch.equal(ref, g) for ref, g in from_graph)
    assert len(argmax_calls) == len(seen) - len(from_graph)  # the prefill steps only
    seen.clear()
    biased = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logit_bias={outs[0].token_ids[1]: -100})
    again = eng.generate(prompts[:1], biased)[0].token_ids
    assert outs[0].token_ids[1] not in again
    assert all(g is not None for _, g in seen[1:])  # the graph still ran; its argmax was not taken


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
def test_cuda_quantized_decode_matches_reference_kernels(arch, mode, tiny_model_dir):
    """A quantized model's CUDA decode steps (the weight-streaming kernels, W8A8 on int8 x
    with the activation in the up projection's epilogue, CUDA graphs) against the same
    quantization run by the plain-torch reference kernels on the CPU in fp32, teacher-forced
    on the reference's tokens. Gated (Llama) and plain GeLU (GPT-2) MLPs."""
    path = tiny_model_dir(arch)
    kw = dict(model=str(path), show_progress=False, quantize=mode)
    cuda = LLMEngine(EngineConfig(device="cuda", dtype="fp16", **kw))
    ref = LLMEngine(EngineConfig(device="cpu", dtype="fp32", **kw))
    prompt = cuda.tokenizer.encode("DeepSpeed is a deep learning library for")
    for eng in (cuda, ref):
        eng.add_request(prompt, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    for step in range(8):
        bc, br = cuda.scheduler.schedule(), ref.scheduler.schedule()
        ours, want = cuda.runner.logits(bc)[0].float().cpu(), ref.runner.logits(br)[0]
        # fp16 activations against fp32 (2e-2, as the fp16 parity test), plus the rare int8
        # step that fp16 rounding moves across a boundary in the weights or activations
        assert ((ours - want).abs().max() / want.abs().max()).item() <= 3e-2, step
        tok = int(want.argmax())
        cuda.postprocess(bc, [tok], [None])
        ref.postprocess(br, [tok], [None])


def test_cuda_penalties_and_logit_bias_track_transformers(tiny_model_dir):
    """OpenAI's penalties and logit_bias on the CUDA sampler, in one batch with plain greedy
    rows (the penalized rows read every earlier token; the others keep the overlapped
    path), against HF fp16 with the same processors."""
    from tests.test_sampling import OpenAIPenalties

    path = tiny_model_dir("LlamaForCausalLM")
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="fp16", show_progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
    prompts = ["Hello, my name is", "DeepSpeed is", "The quick brown fox"]
    n = 16
    plain = eng.generate(prompts, SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0))
    bias = {plain[2].token_ids[0]: -100.0, 11: 4.0}
    params = [SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0, presence_penalty=0.8,
                             frequency_penalty=1.2),
              SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0),
              SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0, logit_bias=bias)]
    outs = eng.generate(prompts, params)
    assert outs[1].token_ids == plain[1].token_ids
    assert plain[2].token_ids[0] not in outs[2].token_ids
    for i, kw in ((0, None), (2, bias)):
        ids = torch.tensor([eng.tokenizer.encode(prompts[i])], device="cuda")
        extra = (dict(logits_processor=transformers.LogitsProcessorList([OpenAIPenalties(ids.shape[1], 0.8, 1.2)]))
                 if kw is None else dict(sequence_bias=[[[t], b] for t, b in kw.items()]))
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **extra)[0, ids.shape[1]:].tolist()
        assert outs[i].token_ids[:4] == ref[:4], prompts[i]  # fp16 near-ties may flip later tokens
        assert outs[i].token_ids != plain[i].token_ids


def test_cuda_prefix_cache_matches_uncached(tiny_model_dir):
    """Shared-prefix prompts on CUDA (graphs on): with the prefix cache, later requests
    prefill only their tails, attending to cached blocks, and decode as without it."""
    path = tiny_model_dir("LlamaForCausalLM")
    kw = dict(model=str(path), device="cuda", dtype="fp16", show_progress=False)
    cached, plain = LLMEngine(EngineConfig(**kw)), LLMEngine(EngineConfig(**kw, enable_prefix_caching=False))
    system = "You are a helpful assistant. Answer briefly and politely, and never make things up. " * 3
    prompts = [system + q for q in ("What is DeepSpeed?", "Where is Seattle?", "Who wrote Hamlet?", "Why?")]
    p = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0)
    got = [cached.generate([q], p)[0].token_ids for q in prompts]  # one at a time: each reuses the last
    want = [o.token_ids for o in plain.generate(prompts, p)]
    assert cached.stats["prefix_cache_hit_tokens"] >= 3 * (len(cached.tokenizer.encode(system)) // 16 - 1) * 16
    agree = 0
    for g, w in zip(got, want):
        assert g[:4] == w[:4]  # fp16: a cached prefix is read, not recomputed; late near-ties may flip
        agree += sum(a == b for a, b in zip(g, w))
    assert agree >= 0.75 * 24 * len(prompts)


def test_cuda_prompt_logprobs_track_transformers(tiny_model_dir):
    """Prompt scoring on CUDA: prompts prefilled in chunks beside decoding requests (their
    scoring rows join the mixed-step graphs' logits rows), against HF's log-softmax in fp32."""
    path = tiny_model_dir("LlamaForCausalLM")
    eng = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="fp16", show_progress=False,
                                 max_num_batched_tokens=16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    prompts = ["DeepSpeed is a deep learning library that makes distributed training easy and fast",
               "Hello, my name is", "The quick brown fox jumps over the lazy dog."]
    scored = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=1)
    background = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    outs = eng.generate(prompts + ["a", "b"], [scored] * 3 + [background] * 2)
    for p, o in zip(prompts, outs):
        ids = eng.tokenizer.encode(p)
        with torch.no_grad():
            lp = hf(torch.tensor([ids], device="cuda")).logits[0, :-1].float().log_softmax(-1).cpu()
        assert len(o.prompt_logprobs) == len(ids) and o.prompt_logprobs[0] is None
        for j, e in enumerate(o.prompt_logprobs[1:], start=1):
            # fp16 weights and activations against fp32: logits agree to ~2e-2 of their scale
            assert e.token_id == ids[j] and abs(e.logprob - lp[j - 1, ids[j]].item()) < 5e-2, (p, j)
            assert abs(e.top[0][1] - lp[j - 1].max().item()) < 5e-2, (p, j)
