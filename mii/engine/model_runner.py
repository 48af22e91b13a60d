"""Per-rank execution: load (and quantize) the model, size and bind the KV cache, turn
a scheduled batch into tensors, run the forward pass and sample."""
from __future__ import annotations

import logging

import torch

from mii.config import EngineConfig
from mii.model.decoder import BatchContext, DecoderModel
from mii.model.loader import load_model
from mii.model.ops import ops_for
from mii.model.quant import check_quant_args, quantize_model, saved_quantization
from mii.policies.base import ModelSpec
from .cuda_graph import DecodeGraphs
from .sampler import Sampler
from .scheduler import ScheduledSeq
from .sequence import TokenLogprob

log = logging.getLogger(__name__)

CPU_KV_BYTES = 512 << 20  # fixed KV budget on CPU, where free memory says little


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
        self.graphs = self._capture_graphs()

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
        return act + logits + (512 << 20)

    def _capture_graphs(self) -> DecodeGraphs | None:
        """Decode CUDA graphs, when asked for and the ops can be captured (the Triton ones;
        the references sync with the host)."""
        if not (self.config.enable_cuda_graph and self.device.type == "cuda" and self.ops.backend == "triton"):
            return None
        max_len = min(self.config.max_model_len or self.spec.max_positions, self.num_blocks * self.block_size)
        try:
            return DecodeGraphs(self.model, self.ops, self.config.max_num_seqs, -(-max_len // self.block_size),
                                self.device)
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

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, BatchContext]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx_lens: list[int] = []
        logits_idx: list[int] = []
        bs = self.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + item.num_tokens)
            ctx_lens.append(end)
            if item.samples:
                logits_idx.append(cu[-1] - 1)
        width = max(len(item.seq.block_table) for item in batch)
        tables: list[int] = []
        for item in batch:
            tables += item.seq.block_table + [0] * (width - len(item.seq.block_table))
        # Two host-to-device copies per step (one per dtype), from pinned memory so they
        # run asynchronously, instead of one small copy per field.
        T, B, S = len(ids), len(batch), len(logits_idx)
        pin = self.device.type == "cuda"
        longs = torch.tensor(ids + positions + slots + logits_idx, dtype=torch.long, pin_memory=pin)
        ints = torch.tensor(tables + cu + ctx_lens, dtype=torch.int32, pin_memory=pin)
        longs = longs.to(self.device, non_blocking=True)
        ints = ints.to(self.device, non_blocking=True)
        ids_t, pos_t, slots_t, logits_t = longs.split([T, T, T, S])
        tables_t, cu_t, ctx_t = ints.split([B * width, B + 1, B])
        return ids_t, BatchContext(positions=pos_t, slot_mapping=slots_t, block_tables=tables_t.view(B, width),
                                   cu_seqlens_q=cu_t, context_lens=ctx_t, logits_indices=logits_t)

    @torch.inference_mode()
    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """[S, vocab] float32 logits for the sequences that sample this step."""
        return self.forward(*self.prepare(batch))

    def forward(self, input_ids: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """A pure decode step (one token and one sample per sequence) replays a CUDA graph."""
        B = ctx.context_lens.numel()
        if (self.graphs is not None and input_ids.numel() == B == ctx.logits_indices.numel()
                and self.graphs.fits(B, ctx.block_tables.shape[1])):
            return self.graphs.run(input_ids, ctx)
        return self.model(input_ids, ctx, self.ops)

    def shutdown(self) -> None:
        """Nothing to stop for a single rank (the TP runner stops its peers)."""

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One forward step; returns a token (and logprob) per sampling sequence, in order."""
        logits = self.logits(batch)
        sampling = [item.seq for item in batch if item.samples]
        if not sampling:
            return [], []
        return self.sampler(logits, sampling)
