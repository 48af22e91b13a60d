"""The layer above the quantization kernels: quantize / dequantize_weight's error bound,
QuantLinear against the dequantized float layer and through a state-dict round trip, and
quantize_model's swap and its argument checks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

# First: without CUDA it switches on Triton's interpreter before anything imports kernels.
from tests.quant_helpers import DEV, rel  # noqa: I001

from mii.model.layers import GatedUpLinear, Linear, QKVLinear
from mii.model.quant import dequantize_weight, quantize_weight
from mii.model.quant_linear import QuantLinear
from mii.model.quant_swap import quantize_model


@pytest.mark.parametrize("mode,group", [("w8a16", 32), ("w8a16", 128), ("w4a16", 32), ("w4a16", 64), ("w8a8", 128)])
def test_quantize_dequantize_error_bound(mode, group):
    w = torch.randn(48, 256) * 0.05
    w[3, :group] = 0  # an all-zero group quantizes to zeros, not NaN
    t = quantize_weight(w, mode, group)
    deq = dequantize_weight(t, mode)
    scales = t["scales"][:, None] if mode == "w8a8" else t["scales"].repeat_interleave(group, dim=1)
    # Symmetric round-to-nearest with max|w| mapped exactly onto the top integer: nothing
    # is clipped, so each element is off by at most half a quantization step.
    assert ((deq - w).abs() <= scales * 0.5 * (1 + 1e-5) + 1e-9).all()
    assert not deq[3, :group].any()
    expected = {"w8a16": (torch.int8, (48, 256), (48, 256 // group)),
                "w4a16": (torch.uint8, (48, 128), (48, 256 // group)),
                "w8a8": (torch.int8, (48, 256), (48,))}[mode]
    assert (t["qweight"].dtype, tuple(t["qweight"].shape), tuple(t["scales"].shape)) == expected


@pytest.mark.parametrize("mode", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("kind,fuse_bias", [(None, True), ("column", False), ("row", True)])
def test_quant_linear_matches_dequantized_linear(mode, kind, fuse_bias):
    torch.manual_seed(0)
    lin = Linear(64, 48, True, kind, torch.float32, fuse_bias=fuse_bias).to(DEV)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.bias.normal_()
    ql = QuantLinear.from_linear(lin, mode, 32)
    assert (ql.kind, ql.fuse_bias) == (kind, fuse_bias) and torch.equal(ql.bias, lin.bias)
    x = torch.randn(5, 64, device=DEV)
    w = dequantize_weight({"qweight": ql.qweight, "scales": ql.scales}, mode)
    ref = F.linear(x, w, lin.bias if fuse_bias else None)
    if mode == "w8a8":
        # per-token activation rounding adds |x| * 2^-8 relative noise per product (max|x| / 254);
        # it averages out over K = 64, so 1% of the output norm is a wide bound
        assert rel(ql(x), ref) < 1e-2
    else:
        assert rel(ql(x), ref) < 1e-5
    # Against the fp layer: a uniform rounding error of a step s = max|w| / qmax has rms s / sqrt(12);
    # with max|w| ~ 2.5 sigma over 32-64 inputs that is ~0.6% of the weight for int8 and ~10%
    # for int4 (plus ~0.6% from int8 activations in w8a8). The bounds allow twice that.
    assert rel(ql(x), lin(x)) < {"w8a16": 1.2e-2, "w8a8": 2e-2, "w4a16": 0.2}[mode]


def test_quantized_state_dict_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file
    lin = Linear(64, 32, True, "row", torch.float32)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.bias.normal_()
    ql = QuantLinear.from_linear(lin, "w4a16", 32)
    assert set(ql.state_dict()) == {"qweight", "scales", "bias"}
    save_file(ql.state_dict(), tmp_path / "q.safetensors")
    with torch.device("meta"):
        fresh = QuantLinear.empty(64, 32, True, "row", True, torch.float32, "w4a16", 32)
    fresh = fresh.to_empty(device="cpu")
    for name, t in load_file(tmp_path / "q.safetensors").items():
        fresh.weight_loader(getattr(fresh, name), t, None)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), ql(x))


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = QKVLinear(64, 4, 2, 16, True, torch.float32)
        self.attn.o = Linear(64, 64, False, "row", torch.float32)
        self.mlp = nn.Module()
        self.mlp.up = GatedUpLinear(64, 96, False, torch.float32)
        self.mlp.down = Linear(96, 64, False, "row", torch.float32)
        self.head = Linear(64, 10, False, None, torch.float32)  # not quantizable: stays fp
        for p in self.parameters():
            nn.init.normal_(p, 0, 0.05)


def test_quantize_model_swaps_only_quantizable_linears():
    model = nn.Sequential(TinyBlock(), TinyBlock())
    before = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, Linear)}
    quantize_model(model, "w8a16", 32, ("attn.qkv", "attn.o", "mlp.up", "mlp.down"))
    for i in range(2):
        block = model[i]
        for name in ("attn.qkv", "attn.o", "mlp.up", "mlp.down"):
            m = block.get_submodule(name)
            assert isinstance(m, QuantLinear), name
            deq = dequantize_weight({"qweight": m.qweight, "scales": m.scales}, "w8a16")
            assert (deq - before[f"{i}.{name}"]).abs().max() <= m.scales.max() / 2 * (1 + 1e-5)
        assert block.attn.qkv.kind == "column" and block.attn.o.kind == "row"
        assert block.mlp.up.fuse_bias is False and block.attn.qkv.bias is not None
        assert type(block.head) is Linear


@pytest.mark.parametrize("mode,group,match", [
    ("int8", 128, "'int8'"),
    ("w8a16", 48, "group_size=48"),
    ("w4a16", 16, "group_size=16"),
])
def test_invalid_mode_or_group_size_raises(mode, group, match):
    model = nn.Sequential(TinyBlock())
    with pytest.raises(ValueError, match=match):
        quantize_model(model, mode, group, ("attn.qkv", "attn.o", "mlp.up", "mlp.down"))
    assert all(type(m) is not QuantLinear for m in model.modules())  # nothing half-swapped
    with pytest.raises(ValueError, match=match):
        quantize_weight(torch.randn(8, 96), mode, group)


def test_quantize_weight_needs_a_group_size_that_divides():
    # quantize_model falls back to a smaller group (tests/test_quant_engine.py); the low level does not
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=96"):
        quantize_weight(torch.randn(8, 96), "w8a16", 128)
