"""The GEMV benchmarks' linear shapes (benchmarks/linears.py) against the transformers model
each benchmark shape builds: per layer, our fused linears hold exactly the layer's matrices."""
import pytest
import torch
import transformers

from benchmarks.linears import linear_shapes
from benchmarks.models import SHAPES, hf_config


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_linear_shapes_cover_each_layers_matrices(name):
    config = hf_config(name)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))[0]  # h, layers
    matrices = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    shapes = linear_shapes(name, lm_head=True)
    assert tuple(shapes.pop("lm_head")) == tuple(model.get_output_embeddings().weight.shape)
    assert sum(n * k for n, k in shapes.values()) == matrices
    hidden = model.get_input_embeddings().weight.shape[1]
    assert shapes["qkv"][1] == hidden and shapes["o"][0] == hidden
