"""The step profile's accounting (each kernel's share of a chain whose kernels overlap under
PDL) and the targets table that RESULTS.md opens with."""
import random

from benchmarks.profile_step import chain_shares
from benchmarks.report import write_report
from benchmarks.report_targets import targets_section, w8a16_budget


def test_chain_shares_add_up_to_the_span_of_overlapping_kernels():
    # a: 0-10; b starts under a (PDL) and ends at 14; c ends inside b; d starts after a gap
    ks = [("a", 0.0, 10.0), ("b", 8.0, 14.0), ("c", 9.0, 13.0), ("d", 20.0, 21.0)]
    assert chain_shares(ks) == [10.0, 4.0, 0.0, 7.0]
    rng = random.Random(0)
    for _ in range(50):
        starts = sorted(rng.uniform(0, 100) for _ in range(30))
        ks = [(str(i), s, s + rng.uniform(0.1, 20)) for i, s in enumerate(starts)]
        shares = chain_shares(ks)
        assert min(shares) >= 0
        assert abs(sum(shares) - (max(e for _, _, e in ks) - ks[0][1])) < 1e-9


def _run(name, pct, ms):
    return {"model": name, "meta": {"date": "2026-01-01"}, "serving_speedup": {"eager": 30.0, "compiled": 2.5},
            "ours": {"startup_s": 4.0, "decode": [{"pct_roofline": pct, "ms_per_step": ms, "replay_ms": ms,
                                                   "replay_pct_roofline": pct, "tok_s": 1e3 / ms}]},
            "hf": {"compiled": {"decode": [{"warmup_s": 20.0}]}}}


def test_targets_state_each_miss_and_its_margin():
    runs = {"llama-1b": _run("llama-1b", 80.0, 1.0), "llama-7b": _run("llama-7b", 90.0, 5.0)}
    text = "\n".join(targets_section(runs, None, None, []))
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 5 |")}
    assert "missed by 5.0 points" in rows["llama-1b fp16 bs=1 decode, % of the memory roofline"]
    assert "0.941 ms" in rows["llama-1b fp16 bs=1 decode, % of the memory roofline"]  # 1.0 ms * 80 / 85
    assert rows["llama-7b fp16 bs=1 decode, % of the memory roofline"].endswith("| met | 2026-01-01 |")
    assert "| met |" in rows["serving workload, output tok/s over HF eager static batches"]
    assert "missed by 0.5x" in rows["serving workload, output tok/s over HF compiled static batches"]


def test_results_md_regenerates_from_the_committed_files(tmp_path):
    from pathlib import Path
    results = Path(__file__).parent.parent / "benchmarks" / "results"
    out = tmp_path / "RESULTS.md"
    write_report(results, out)
    text = out.read_text()
    assert text.index("## Targets") < text.index("## llama-1b")
    assert text == (results.parent / "RESULTS.md").read_text()  # the committed report is the regenerated one


def test_w8a16_budget_is_what_the_speedup_leaves_the_gemvs():
    def prof(model, ms, kinds, linears):
        return {"model": model, "traced_replay_ms": ms, "roofline_ms": 1.87, "kernels": kinds,
                "linears": {k: {"us": u, "bytes_us": b} for k, (u, b) in linears.items()}}
    p16 = prof("m", 3.6, {"gemm": {"count": 5, "us": 3300}, "attention": {"count": 1, "us": 100},
                          "norm": {"count": 1, "us": 2}, "copies": {"count": 1, "us": 10}},
               {"qkv": (1000, 960), "o": (500, 480), "up": (1000, 980), "down": (700, 660), "lm_head": (90, 90)})
    p8 = prof("m w8a16", 2.4, {"gemm": {"count": 5, "us": 2000}, "attention": {"count": 1, "us": 150},
                               "norm": {"count": 2, "us": 60}},
              {"qkv": (530, 480), "o": (280, 240), "up": (550, 490), "down": (380, 330), "lm_head": (90, 90)})
    # 3600 / 1.8 = 2000 us, less the int8 bytes (1540), the LM head (90) and fp16's attention and copies (110)
    text = w8a16_budget(p16, p8)
    assert "a 2.000 ms step" in text and "could lose 260 us" in text and "65.0 us each" in text
    assert "They lose 50.0 us each now" in text
    assert "GEMVs, which stream twice the bytes in the same kernels, 30.0 us" in text
    assert "asks for about as much: a 2.200 ms step." in text  # the roofline's 1.87 ms / 0.85


def test_reference_line_takes_the_yardsticks_best_int8_and_our_ratio_beside_it():
    from benchmarks.report_reference import reference_line, reference_section

    step = lambda ms, pct: {"ms": ms, "pct_roofline": pct, "compile_s": 1.0}  # noqa: E731
    d = {"model": "m", "ctx": 192, "meta": {"torch": "t", "device": "d", "date": "2026-01-01", "transformers": "x",
                                             "copy_bw_gb_s": 3000.0},
         "steps": {"fp16": step(6.0, 70.0), "int8_row": step(5.0, 43.0), "int8_g128": step(8.0, 26.0)},
         "ours": {"fp16": {"replay_ms": 4.5}, "w8a16": {"replay_ms": 3.0}}}
    for r in d["steps"].values():
        r["speedup_vs_fp16"] = 6.0 / r["ms"]
    line = reference_line(d)
    assert "(per-row scales, gpt-fast's) is 1.20x its fp16 step, at 43% of its roofline" in line
    assert "ours on the same machine 1.50x (3.000 against 4.500 ms; its steps 5.000 and 6.000 ms)" in line
    assert "| ours W8A16, groups of 128 | 3.000 |  | 1.50x |  |" in reference_section(d)
