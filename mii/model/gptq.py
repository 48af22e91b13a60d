"""GPTQ (Frantar et al., 2023): round a linear's weights so that its *outputs* on real
inputs stay close, not each weight on its own.

For a layer y = x W^T fed inputs X, the output error of a weight change dW is
tr(dW H dW^T) / 2 with H = 2 X^T X. GPTQ rounds the columns (inputs) of W in order and
after each one moves the not-yet-rounded columns to absorb its rounding error, by the
row of the Cholesky factor of H^-1 (the optimal update of Optimal Brain Surgeon). The
result is stored exactly as :func:`mii.model.quant.quantize_weight` stores it: the same
symmetric integers, group scales and group size, so the kernels and the checkpoint
loader do not know the difference. Each group's scale is taken from its columns as
they stand when the group is reached (after the earlier groups' updates).

:func:`gptq_model` follows the paper's recipe: blocks in order, each block's linears
in the order the forward pass meets them (qkv, o, up, down), every linear's H from
the inputs it gets with everything before it already quantized.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kernels.quant_gemm import pack_int4
from mii.policies.base import DEFAULT_QUANTIZABLE
from .calibrate import Calibrator, observe_inputs
from .decoder import DecoderModel
from .layers import Linear
from .quant import _QMAX, check_quant_args, dequantize_weight, group_size_for, quantize_weight
from .quant_swap import _matches, quantize_model

DAMP = 0.01  # of the mean diagonal, added to H's diagonal: keeps the inverse stable
_W8A8_BLOCK = 128  # columns per lazy update when one scale covers the whole row (w8a8)
_CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate scales, as fractions of max|w| / qmax


def _clip_scale(w: torch.Tensor, qmax: int, importance: torch.Tensor) -> torch.Tensor:
    """Per row of w [rows, g], the scale among _CLIP * max|w| / qmax with the least rounding
    error, each column's error weighted by its input's mean square (H's diagonal): clipping
    the rare largest weight often buys a finer grid for all the others."""
    amax = w.abs().amax(1).clamp(min=1e-10) / qmax
    best, best_err = amax, None
    for c in _CLIP:
        s = c * amax
        err = ((w - torch.round(w / s[:, None]).clamp(-qmax, qmax) * s[:, None]).pow(2) * importance).sum(1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, mode: str, group_size: int, damp: float = DAMP
                  ) -> dict[str, torch.Tensor]:
    """GPTQ-quantize w [out, in] given H = 2 X^T X / n [in, in] of its calibration inputs;
    returns ``qweight`` and ``scales`` shaped as ``quantize_weight(w, mode, group_size)`` returns them."""
    check_quant_args(mode, group_size)
    rows, cols = w.shape
    group = cols if mode == "w8a8" else group_size
    if cols % group:
        raise ValueError(f"group_size={group} does not divide in_features={cols}")
    qmax = _QMAX[mode]
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = H.diagonal().clone()
    H.diagonal().add_(damp * importance.mean())
    # Upper Cholesky factor of H^-1: row j says how rounding column j moves columns j.. .
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # Columns of W are rows here (Wt = W^T), so the inner loop touches contiguous memory.
    Wt, Qt = W.t().contiguous(), torch.empty(cols, rows, dtype=torch.float32, device=W.device)
    scales = torch.empty(rows, cols // group, dtype=torch.float32, device=W.device)
    if mode == "w8a8":  # one scale per row, from the row before any update
        scales[:, 0] = _clip_scale(W, qmax, importance)
    block = _W8A8_BLOCK if mode == "w8a8" else group  # lazy updates, one block of columns at a time
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        W1, U1 = Wt[b0:b1], U[b0:b1, b0:b1]  # W1 is a view: updated in place
        err = torch.empty_like(W1)
        if mode == "w8a8":
            s = scales[:, 0]
        else:  # a group is a block: its scale from its columns as the earlier groups left them
            s = scales[:, b0 // group] = _clip_scale(W1.t(), qmax, importance[b0:b1])
        for j in range(b1 - b0):
            q = Qt[b0 + j] = torch.round(W1[j] / s).clamp_(-qmax, qmax)
            err[j] = (W1[j] - q * s) / U1[j, j]
            W1[j + 1:].addr_(U1[j, j + 1:], err[j], alpha=-1)  # the rest of the block absorbs it
        Wt[b1:] -= U[b0:b1, b1:].t() @ err  # ... and, at once, every later block
    Q = Qt.t().to(torch.int8)
    if mode == "w4a16":
        return {"qweight": pack_int4(Q), "scales": scales}
    if mode == "w8a8":
        return {"qweight": Q, "scales": scales[:, 0].contiguous()}
    return {"qweight": Q, "scales": scales}


class _Enough(Exception):
    """Raised by a hook once it has seen the input it wanted: the rest of the block need not run."""


def hessian(cal: Calibrator, i: int, x: torch.Tensor, residual: torch.Tensor | None, linear: Linear
            ) -> torch.Tensor:
    """H = 2 X^T X / n of the inputs ``linear`` (in block ``i``) gets when (x, residual) enters the block."""
    seen: list[torch.Tensor] = []

    def record(name: str, inp: torch.Tensor) -> None:
        seen.append(inp)
        raise _Enough

    with observe_inputs({"linear": linear}, record):
        try:
            cal.block(i, x, residual)
        except _Enough:
            pass
    X = seen[0]
    return (X.t() @ X) * (2.0 / X.shape[0])


# The linears GPTQ quantizes; the others get round-to-nearest. qkv is left out, by
# measurement on SmolLM2-135M at W4A16 (perplexity increase on eval_text.txt's first 512
# tokens; round-to-nearest everywhere: +34.9%): GPTQ on o/up/down gives +13.5-14%, on all
# four +26%. Round-to-nearest costs qkv only +0.2% there, while GPTQ fits qkv to the calibration
# tokens and spoils the keys and values of each sequence's first token (the attention sink,
# whose residual reaches ~20000 against ~150 elsewhere), which every later query reads:
# that token's qkv error grew from 18% to 55% in layer 15.
GPTQ_LINEARS = ("attn.o", "mlp.up", "mlp.down")


@torch.no_grad()
def gptq_model(model: DecoderModel, cal: Calibrator, mode: str, group_size: int,
               quantizable: tuple[str, ...] = DEFAULT_QUANTIZABLE, show_progress: bool = False,
               linears: tuple[str, ...] = GPTQ_LINEARS, damp: float = DAMP) -> DecoderModel:
    """Quantize ``model``'s quantizable linears in place and return it: those named in
    ``linears`` with GPTQ, the rest round-to-nearest. The result is what ``quantize_model``
    makes, with better-chosen integers.

    Blocks go in order, and within a block the linears in the order its forward meets them;
    each one's H comes from the inputs it gets with everything before it already rounded.
    Until the end a rounded linear stays an fp ``Linear`` holding its dequantized weight
    (the same function as its ``QuantLinear``, without dequantizing at every call; W8A8's
    per-token activation rounding is therefore not part of what later layers see).
    """
    check_quant_args(mode, group_size)
    chosen: dict[Linear, dict[str, torch.Tensor]] = {}
    x, residual = cal.embed()
    blocks = tqdm(range(len(model.layers)), desc=f"GPTQ ({mode})", unit="block", disable=not show_progress)
    for i in blocks:
        block = model.layers[i]
        for stage in ("attn.qkv", "attn.o", "mlp.up", "mlp.down"):
            name, lin = f"layers.{i}.{stage}", block.get_submodule(stage)
            if not isinstance(lin, Linear) or not _matches(name, quantizable):
                continue
            group = group_size_for(lin.in_features, mode, group_size, name)
            if stage in linears:
                tensors = gptq_quantize(lin.weight, hessian(cal, i, x, residual, lin), mode, group, damp)
            else:
                tensors = quantize_weight(lin.weight, mode, group)
            lin.weight.copy_(dequantize_weight(tensors, mode))
            chosen[lin] = tensors
        x, residual = cal.block(i, x, residual)  # the next block sees this one rounded
    return quantize_model(model, mode, group_size, quantizable, weights=lambda lin, group: chosen[lin])
