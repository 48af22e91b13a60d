"""Per-rank execution: load (and quantize) the model, size and bind the KV cache, turn
a scheduled batch into tensors, run the forward pass and sample."""
from __future__ import annotations

import logging

import torch

from mii.config import EngineConfig
from mii.model.decoder import DecoderModel
from mii.model.fold import fold_norm_weights
from mii.model.loader import load_model
from mii.model.ops import ops_for
from mii.model.quant import check_quant_args
from mii.model.quant_swap import quantize_model, saved_quantization
from mii.policies.base import ModelSpec
from .cuda_graph import StepGraphs
from .inputs import StepInputs
from .precompile import precompile
from .sampler import Sampled, Sampler
from .scheduler import ScheduledSeq
from .prompt_logprobs import PromptRows, PromptScores
from .sequence import Sequence, TokenLogprob

log = logging.getLogger(__name__)

CPU_KV_BYTES = 512 << 20  # fixed KV budget on CPU, where free memory says little
COMPILE_THREADS = 8  # threads compiling Triton kernels before capture (0: each as capture meets it)


class ModelRunner:
    def __init__(self, config: EngineConfig, spec: ModelSpec, path: str, device: torch.device,
                 dtype: torch.dtype, eos_token_ids: set[int]):
        self.config, self.spec, self.device, self.dtype = config, spec, device, dtype
        self.model: DecoderModel = self._load(path)
        self.ops = ops_for(device)
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        self._allocate_kv()
        self.sampler = Sampler(spec.vocab, eos_token_ids, device, config.seed)
        # The last launched step's sampled tokens, still on the device, and each sampling
        # sequence's row in them: the next step may take its input ids from there. A fixed
        # buffer, so that a CUDA graph can read it (and a decode graph write its argmax there).
        self.last = torch.zeros(config.max_num_seqs, dtype=torch.long, device=device)
        self._last_rows: dict = {}
        self._greedy: torch.Tensor | None = None  # the argmax of the last forward's logits, if a graph gave it
        self.graphs = self._capture_graphs()
        if device.type == "cuda":
            self.sampler.warm_up()

    def _load(self, path: str) -> DecoderModel:
        """Load this rank's shard, then quantize it on the fly if asked: after slicing, so each
        rank quantizes only its own weights. A checkpoint from ``mii.quantize`` loads as saved."""
        mode, saved = self.config.quantize, saved_quantization(self.spec.hf_config)
        if mode is not None:
            check_quant_args(mode, self.config.quant_group_size)  # before the load, not after
            if saved is not None and saved["mode"] != mode:
                raise ValueError(f"quantize={mode!r}, but {path!r} is already quantized as {saved['mode']!r}; "
                                 f"pass quantize=None or the fp checkpoint")
        model = load_model(path, self.spec, self.dtype, self.device, self.config.show_progress)
        if mode is not None and saved is None:
            quantize_model(model, mode, self.config.quant_group_size, self.spec.policy.quantizable)
        if self.config.fold_norms and mode is None and saved is None and model.foldable():
            fold_norm_weights(model)
            model.fold_norms = True
        return model

    def _num_blocks(self) -> int:
        attn = self.model.layers[0].attn
        per_block = (2 * self.spec.num_layers * self.block_size * attn.kv_heads * attn.head_dim
                     * torch.empty(0, dtype=self.dtype).element_size())
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_fraction) - self._activation_reserve()
        else:
            budget = CPU_KV_BYTES
        n = budget // per_block
        if n < 1:
            raise ValueError(f"KV-cache budget of {budget} bytes holds no block of {per_block} bytes")
        return n

    def _activation_reserve(self) -> int:
        """A generous bound on what one step's activations, logits and CUDA graphs take,
        kept out of the KV budget so the largest step never runs out of memory."""
        s, c = self.spec, self.config
        act = c.max_num_batched_tokens * (6 * s.hidden + 3 * s.intermediate) * self.dtype.itemsize
        logits = c.max_num_seqs * s.vocab * 4 * 4  # fp32 logits plus the sampler's copies
        # prompt_logprobs: every token of a step may be a logits row, in the model's dtype,
        # scored in float32 chunks (the chunk and logsumexp's temporary)
        scores = s.vocab * (c.max_num_batched_tokens * self.dtype.itemsize + PromptScores.chunk * 4 * 2)
        return act + logits + scores + (512 << 20)

    def _capture_graphs(self) -> StepGraphs | None:
        """CUDA graphs for decode and mixed steps, when asked for and the ops can be
        captured (the Triton ones; the references sync with the host)."""
        if not (self.config.enable_cuda_graph and self.device.type == "cuda" and self.ops.backend == "triton"):
            return None
        max_len = min(self.config.max_model_len or self.spec.max_positions, self.num_blocks * self.block_size)
        graphs = StepGraphs(self.model, self.ops, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                            -(-max_len // self.block_size), self.last)
        try:
            if COMPILE_THREADS:  # on a cold Triton cache, every kernel at once rather than as met
                with torch.inference_mode():
                    precompile([self.sampler.warm_up, *graphs.passes()], COMPILE_THREADS)
            graphs.capture()
            return graphs
        except RuntimeError as e:  # e.g. an op that cannot be captured: run eagerly, loudly
            log.warning("CUDA graph capture failed, decoding eagerly: %s", e)
            return None

    def _allocate_kv(self) -> None:
        attn = self.model.layers[0].attn
        shape = (self.spec.num_layers, 2, self.num_blocks, self.block_size, attn.kv_heads, attn.head_dim)
        # zeros, not empty: masked-out cache slots still meet V in the softmax product, and
        # 0 * NaN from uninitialized memory would be NaN
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.attn.k_cache, layer.attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]

    def pack(self, batch: list[ScheduledSeq]) -> StepInputs:
        return StepInputs.pack(batch, self.block_size, self._last_rows, pin=self.device.type == "cuda")

    def step_logits(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, PromptRows | None]:
        """The step's logits rows, and which of them score prompt positions (None: all sample)."""
        inputs = self.pack(batch)
        return self.forward(inputs, float32=inputs.prompt is None), inputs.prompt

    @torch.inference_mode()
    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """[S, vocab] float32 logits for the sequences that sample this step."""
        logits, prompt = self.step_logits(batch)
        return logits if prompt is None else prompt.split(logits)[0].float()

    def forward(self, inputs: StepInputs, float32: bool = True) -> torch.Tensor:
        """Replays a CUDA graph where one fits the step's shape (a choice made from sizes
        alone, so every tensor-parallel rank makes the same one), else runs eagerly. Input
        ids the host does not know yet are fed from ``last``."""
        if self.graphs is not None and (key := self.graphs.key(inputs.sizes)) is not None:
            logits, self._greedy = self.graphs.run(key, inputs, float32)
            return logits
        self._greedy = None
        return self.model(*inputs.to_device(self.device, self.last), self.ops, float32)

    def shutdown(self) -> None:
        """Nothing to stop for a single rank (the TP runner stops its peers)."""

    def dead_peer(self) -> str | None:
        """A single rank has no peers to lose (see the TP runner)."""
        return None

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq]) -> tuple[Sampled | None, PromptScores | None]:
        """Queue one step (forward, sampling and any prompt scoring) on the device without
        waiting for it. Call before the sequences' progress is advanced for this step."""
        sampling = [item.seq for item in batch if item.samples]
        logits, prompt = self.step_logits(batch)
        scores = None
        if prompt is not None:  # logits in the model's dtype: PromptScores converts them in chunks
            logits, scores = prompt.split(logits)
            logits = logits.float()
        if not sampling:
            self._last_rows = {}
            return None, scores
        sampled = self.sampler.sample(logits, sampling, self._greedy if prompt is None else None)
        if sampled.tokens.data_ptr() != self.last.data_ptr():  # not a decode graph's own argmax
            self.last[:len(sampling)].copy_(sampled.tokens)
        self._last_rows = {seq: i for i, seq in enumerate(sampling)}
        return sampled, scores

    @staticmethod
    def collect(launched: tuple[Sampled | None, PromptScores | None]
                ) -> tuple[list[int], list[TokenLogprob | None], list[tuple[Sequence, TokenLogprob]]]:
        """Wait for a launched step: a token (and logprob) per sampling sequence, in order,
        and the prompt positions it scored."""
        sampled, scores = launched
        tokens, logprobs = sampled.host() if sampled is not None else ([], [])
        return tokens, logprobs, scores.host() if scores is not None else []
