"""Our top-level `kernels` package must not disturb transformers, which probes for
Hugging Face's package of the same name."""
import subprocess
import sys
import textwrap


def test_transformers_loads_a_model_with_our_kernels_installed(tiny_model_dir):
    path = tiny_model_dir("LlamaForCausalLM")
    code = textwrap.dedent(f"""
        import kernels, importlib.metadata as md
        assert not hasattr(kernels, "__version__")
        assert "mii-serve" in md.packages_distributions().get("kernels", []), md.packages_distributions().get("kernels")
        import torch, transformers
        from transformers.utils import is_kernels_available
        assert not is_kernels_available()
        m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})
        out = m(torch.tensor([[1, 2, 3]])).logits
        assert out.shape == (1, 3, m.config.vocab_size)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
