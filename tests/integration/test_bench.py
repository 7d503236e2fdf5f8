"""`ncf-ray bench ... --quick`: each bench writes its JSON (fields present and positive, never a speed asserted)
and regenerates RESULTS.md with the plots. Serve's bench is exercised by tests/integration/test_serve.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ncf_ray import bench


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_rows(res: dict) -> None:
    assert res["rows"]
    for r in res["rows"]:
        assert _positive(r["value"]), r
        if r["baseline_value"] is not None:
            assert _positive(r["baseline_value"]) and _positive(r["ratio"]), r
    for key in ("command", "date", "machine", "seconds"):
        assert res[key], key


def test_bench_train_quick(ray_local, tmp_path):
    out = tmp_path / "results"
    res = bench.run_bench("train", quick=True, out=out)["train"]
    _check_rows(res)
    for key in ("ratio", "plain_samples_per_s", "ray_samples_per_s_per_worker", "scaling_1_to_2",
                "ray2_samples_per_s"):
        assert _positive(res[key]), key
    assert all(_positive(p["samples_per_s"]) for p in res["batch_sweep"])
    ttq = res["time_to_quality"]
    assert ttq["runs"] and all(_positive(p["seconds"]) for p in ttq["runs"][0]["curve"])
    assert 0 < ttq["converged_hr@10"] <= 1
    on_disk = json.loads((out / "train.json").read_text())
    assert on_disk["ratio"] == res["ratio"] and on_disk["quick"] is True
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## train" in report and "plain torch loop" in report and "Time to quality" in report
    for png in ("throughput_vs_batch.png", "time_to_quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prepare_quick(tmp_path):
    res = bench.run_bench("prepare", quick=True, out=tmp_path / "results")["prepare"]
    _check_rows(res)
    assert res["sizes"]["1m"]["rows"] > 0
    assert "## prepare" in (tmp_path / "RESULTS.md").read_text()


def test_bench_eval_and_gpu_quick_from_the_cli(tmp_path):
    out = tmp_path / "results"
    for name in ("eval", "gpu"):
        proc = subprocess.run([sys.executable, "-m", "ncf_ray.cli", "bench", name, "--quick", "--json",
                               "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        _check_rows(res)
        assert json.loads((out / f"{name}.json").read_text())["rows"] == res["rows"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["rows"][0]["baseline"].startswith("popularity")
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## eval" in report and "## gpu" in report


def test_bench_all_dispatches_every_bench_and_reports_them(tmp_path, monkeypatch):
    # The wiring of `all` without the cost: each runner replaced by a canned result.
    def fake(name):
        return lambda quick: {"rows": [bench.row(f"{name} figure", 2.0, "x/s", "base", 1.0)]}

    monkeypatch.setattr(bench, "RUNNERS", {n: fake(n) for n in bench.BENCHES})
    results = bench.run_bench("all", quick=True, out=tmp_path / "results")
    assert sorted(results) == sorted(bench.BENCHES)
    report = (tmp_path / "RESULTS.md").read_text()
    for name in bench.BENCHES:
        assert f"## {name}" in report and f"{name} figure" in report
    assert "| 2 |" in report


def test_bench_unknown_name_is_a_user_error(tmp_path):
    from ncf_ray.errors import UserError

    with pytest.raises(UserError, match="nope"):
        bench.run_bench("nope", quick=True, out=tmp_path)
