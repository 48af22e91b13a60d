"""benchmarks.run reuses HF's figures from an earlier result file; the date it reports for
them must be HF's own run, also when that file itself reused them."""
import json

from benchmarks.run import reusable_hf


def _write(path, date, hf_date=None, requests=1000):
    d = {"meta": {"device": "GPU X", "date": date}, "ours": {"serving": {"requests": requests}},
         "hf": {"eager": {"bs1_tok_s": 17.0}}}
    if hf_date:
        d["hf_reused_from"] = hf_date
    path.write_text(json.dumps(d))


def test_reused_hf_keeps_the_date_of_the_hf_run(tmp_path):
    _write(tmp_path / "m.json", "2026-11-23", hf_date="2026-11-22")
    assert reusable_hf(tmp_path, "m", "GPU X", 1000) == {"hf": {"eager": {"bs1_tok_s": 17.0}}, "from": "2026-11-22"}
    _write(tmp_path / "m.json", "2026-11-23")
    assert reusable_hf(tmp_path, "m", "GPU X", 1000)["from"] == "2026-11-23"


def test_hf_figures_are_not_reused_across_devices_or_workloads(tmp_path):
    _write(tmp_path / "m.json", "2026-11-23")
    assert reusable_hf(tmp_path, "m", "GPU Y", 1000) is None
    assert reusable_hf(tmp_path, "m", "GPU X", 200) is None
    assert reusable_hf(tmp_path, "other", "GPU X", 1000) is None
