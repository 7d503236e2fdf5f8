"""`ncf-ray bench all --quick`, run once for the module through the real CLI and the real runners at tiny sizes.

Each test reads that one run: every bench wrote its JSON (figures present, positive and finite; each ratio the
quotient of the two figures measured beside it, never a speed asserted) and RESULTS.md carries each bench's
section, rows and the command line that produced them. The serve bench runs here too (its own apps beside a
no-op floor), so tests/integration/test_serve.py does not run it a second time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncf_ray import bench
from ncf_ray.bench.train import TRAIN_SIZES

ROOT = Path(__file__).resolve().parents[2]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    """One `ncf-ray bench all --quick --json` in a fresh process (it starts and stops its own Ray per bench)."""
    out = tmp_path_factory.mktemp("bench") / "results"
    cmd = [sys.executable, "-m", "ncf_ray.cli", "bench", "all", "--quick", "--out", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"out": out, "printed": printed, "stdout": proc.stdout,
            "command": f"ncf-ray bench all --quick --out {out}", "report": (out.parent / "RESULTS.md").read_text()}


def test_every_bench_wrote_positive_rows_whose_ratio_is_the_two_measured_figures(quick_all):
    out = quick_all["out"]
    assert sorted(quick_all["printed"]) == sorted(bench.BENCHES)
    for name in bench.BENCHES:
        res = json.loads((out / f"{name}.json").read_text())
        assert res["rows"] == quick_all["printed"][name]["rows"], name  # what was printed is what was written
        assert res["name"] == name and res["quick"] is True and _positive(res["seconds"])
        assert res["command"] == quick_all["command"] and res["date"] and res["machine"]["torch"]
        for r in res["rows"]:
            assert _positive(r["value"]), (name, r)
            if r["baseline"] is None:
                assert r["baseline_value"] is None and r["ratio"] is None, (name, r)
            else:
                assert _positive(r["baseline_value"]), (name, r)
                assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"], rel=1e-9), (name, r)


def test_results_md_carries_every_section_row_and_the_command_line(quick_all):
    report = quick_all["report"]
    assert report.startswith("# Benchmark results")
    for name in bench.BENCHES:
        assert f"## {name} (quick sizes)" in report
        for r in quick_all["printed"][name]["rows"]:
            assert f"| {r['figure']} |" in report, r["figure"]
    assert report.count(f"`{quick_all['command']}`") == len(bench.BENCHES)
    assert report.index("## prepare") < report.index("## train") < report.index("## gpu")  # BENCHES order
    for png in ("throughput_vs_batch.png", "time_to_quality.png"):
        assert (quick_all["out"] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](results/{png})" in report


def test_train_compares_ray_with_the_plain_loop_it_measured(quick_all):
    res = quick_all["printed"]["train"]
    plain, ray1 = res["plain_samples_per_s"], res["ray_samples_per_s_per_worker"]
    assert all(_positive(x) for x in (plain, ray1))
    assert res["ratio"] == pytest.approx(ray1 / plain)
    # --quick runs no 2-worker scaling run (test_train.py trains 2 workers): no figure rather than a made-up one.
    assert res["ray2_samples_per_s"] is None and res["scaling_1_to_2"] is None and res["ray2_history"] == []
    first = res["rows"][0]
    assert (first["value"], first["baseline_value"]) == (ray1, plain)
    # Plain-loop epochs before and after the Ray run, the warm-up epoch of each dropped.
    assert len(res["plain_epochs_samples_per_s"]) == 2 * (TRAIN_SIZES[True]["plain_epochs"] - 1)
    assert len(res["ray1_history"]) == len(res["seq"]["ray1_history"]) == TRAIN_SIZES[True]["ray_epochs"]
    assert [p["batch_size"] for p in res["batch_sweep"]] == list(TRAIN_SIZES[True]["sweep"])
    assert all(_positive(p["samples_per_s"]) for p in res["batch_sweep"])
    ttq = res["time_to_quality"]
    hrs = [p["valid_hr@10"] for p in ttq["runs"][0]["curve"]]
    assert ttq["converged_hr@10"] == max(hrs) and 0 < max(hrs) <= 1
    assert "Time to quality" in quick_all["report"] and "plain torch loop" in quick_all["report"]


def test_eval_prepare_serve_gpu_report_their_own_figures(quick_all):
    got = quick_all["printed"]
    ev = got["eval"]
    assert ev["rows"][0]["baseline"].startswith("popularity")
    assert ev["rows"][2]["value"] == pytest.approx(ev["users"] / ev["rows"][0]["value"])  # seconds = users / rate
    assert got["prepare"]["sizes"]["1m"]["rows"] > 0 and list(got["prepare"]["sizes"]) == ["1m"]
    serve = got["serve"]
    assert serve["rows"][0]["value"] == serve["recommend"]["rps"]
    assert serve["rows"][0]["baseline_value"] == serve["noop_floor"]["rps"]
    assert serve["recommend"]["errors"] == serve["recommend_batch"]["errors"] == 0
    fast = got["gpu"]["runs"]["fast"]
    assert fast["device"] == "cpu" and fast["settings"]["batch_size"] == 1024 and len(fast["epochs"]) == 2
    assert got["gpu"]["rows"][0]["value"] == fast["epoch_samples_per_s"]


def test_bench_unknown_name_is_a_user_error(tmp_path):
    from ncf_ray.errors import UserError

    with pytest.raises(UserError, match="nope"):
        bench.run_bench("nope", quick=True, out=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
