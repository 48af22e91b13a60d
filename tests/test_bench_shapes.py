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


def test_benchmark_tokenizer_covers_the_models_vocabulary(tmp_path):
    # The benchmarks detokenize what random models sample, as a server does: every id of the
    # model's vocabulary must be a token, or the decoder's unknown-id path is what gets timed.
    from tests.tiny_models import VOCAB, make_tokenizer

    n = hf_config("gpt2-124m").vocab_size
    tok = make_tokenizer(tmp_path, n)
    assert len(tok) == n
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = list(range(n - 200, n))
    assert all(reloaded.convert_ids_to_tokens(i) is not None for i in ids)
    assert len(reloaded.decode(ids)) >= 200  # each id decodes to at least one character
    assert reloaded.decode(reloaded("Hello world, DeepSpeed is fast.")["input_ids"]) == "Hello world, DeepSpeed is fast."
    assert len(make_tokenizer(tmp_path / "tiny")) == VOCAB  # the tests' own tokenizer is unchanged
