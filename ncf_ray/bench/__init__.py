"""Benchmarks that print each figure beside a baseline measured in the same run, and the ratio.

    ncf-ray bench {prepare,train,eval,serve,gpu,features,all} [--quick] [--json] [--out bench/results]

Each bench writes `<out>/<name>.json` atomically and regenerates `<out>/../RESULTS.md` (bench/RESULTS.md by
default): one Markdown table of every results JSON present, with the command, date and machine of each, plus
the plots `<out>/throughput_vs_batch.png` and `<out>/time_to_quality.png`. `--quick` uses tiny sizes (the test
suite runs it) and writes to bench/quick/results unless --out says otherwise, so quick figures never overwrite
the real ones.

This package holds the runner and the report; each bench is one module with one entry, `<module>.measure(quick)`:
- prepare (ncf_ray/bench/prepare.py): rows/s and peak memory of `prepare` on the synthetic source, each size in
  a fresh subprocess;
- train (train.py): a Ray Train worker vs a plain torch loop on engine.py, 1 -> 2 worker scaling, throughput vs
  batch size, time to quality;
- eval (eval.py): sampled and full-ranking evaluation vs the popularity baseline scored by the same code;
- serve (serve.py): HTTP req/s and latency of the Serve app vs a no-op endpoint, bf16 vs fp32 scoring;
- gpu (gpu.py): `python -m ncf_ray.bench.gpu` in a subprocess (Ray-free); on CUDA a plain fp32 run is the
  baseline of the fast (bf16, 1M batch) run;
- features (features.py): plain-torch training samples/s of each family with item and user side features vs
  the ID-only model of the same family, same batch, same process.

The bench modules import the stages; no stage imports them. Nothing here imports Ray or a bench module at import
time (the runner loads a bench when it runs it), so `ncf_ray.bench.gpu` stays importable on a machine without Ray.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ncf_ray.atomic import replacing, write_json
from ncf_ray.errors import UserError

BENCHES = ("prepare", "train", "eval", "serve", "gpu", "features")
DEFAULT_OUT = "bench/results"
QUICK_OUT = "bench/quick/results"
# bench name -> the module whose `measure(quick)` runs it (loaded only when that bench runs).
RUNNERS: dict[str, str] = {name: f"ncf_ray.bench.{name}" for name in BENCHES}
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ helpers
def machine() -> dict[str, Any]:
    """Where the figures come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def row(figure: str, value: float, unit: str, baseline: str | None = None, baseline_value: float | None = None,
        goal: str | None = None) -> dict[str, Any]:
    """One table row: a figure, its same-run baseline and their ratio."""
    ratio = value / baseline_value if baseline_value else None
    return {"figure": figure, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": ratio, "goal": goal}


def run_module(module: str, args: list[str], what: str, env: dict[str, str] | None = None,
               stdin: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run `python -m <module> <args>` in a fresh process and return the JSON object on the last line of its
    stdout. `env` (default: this process's) gets this checkout first on PYTHONPATH, so the child runs the same
    code uninstalled. Raises RuntimeError("<what> failed: ...", the tail of the child's stderr) on a non-zero exit."""
    import subprocess

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ report
def runner(name: str) -> Callable[[bool], dict[str, Any]]:
    """The `measure(quick)` entry of bench `name`: returns {"rows": [row(...), ...], **the bench's raw figures}."""
    return importlib.import_module(RUNNERS[name]).measure


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:  # NaN: not reached
            return "not reached"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def render_report(out: Path) -> str:
    """Markdown of every <out>/*.json, in BENCHES order, plus the plots when present."""
    report = out.parent / "RESULTS.md"
    lines = ["# Benchmark results", "",
             f"Regenerated by `ncf-ray bench` from `{os.path.relpath(out, report.parent)}/*.json`. Each figure stands "
             "beside a baseline measured in the same run; ratio = figure / baseline.", ""]
    for name in BENCHES:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        m = res.get("machine", {})
        lines += [f"## {name}{' (quick sizes)' if res.get('quick') else ''}", "",
                  f"`{res.get('command')}` — {res.get('date')}, {res.get('seconds', 0):.0f} s; {m.get('cpu')} "
                  f"({m.get('cpus')} CPUs), torch {m.get('torch')}, ray {m.get('ray', '—')}, "
                  f"load {m.get('load_avg_1m', '—')}", "",
                  "| figure | value | unit | baseline | baseline value | ratio | goal |",
                  "|---|---:|---|---|---:|---:|---|"]
        for r in res["rows"]:
            lines.append(f"| {r['figure']} | {_fmt(r['value'])} | {r['unit']} | {r['baseline'] or '—'} | "
                         f"{_fmt(r['baseline_value'])} | {_fmt(r['ratio'])} | {r.get('goal') or ''} |")
        if name == "train" and "time_to_quality" in res:
            lines += ["", *_ttq_lines(res)]
        lines.append("")
    # Real-data evidence (MovieLens may not be stored here, so no bench regenerates it): kept beside the results,
    # with the commands that produced every figure, and carried into each regenerated report.
    real = out / "real_data.md"
    if real.exists():
        lines += [real.read_text().rstrip(), ""]
    for png, title in (("throughput_vs_batch.png", "Throughput vs batch size"),
                       ("time_to_quality.png", "Valid HR@10 vs seconds of training")):
        if (out / png).exists():
            lines += [f"![{title}]({os.path.relpath(out / png, report.parent)})", ""]
    return "\n".join(lines)


def _ttq_lines(res: dict[str, Any]) -> list[str]:
    ttq = res["time_to_quality"]
    workers = ttq["runs"][0].get("config", {}).get("workers", 2) if ttq["runs"] else 2
    lines = [f"Time to quality ({workers} worker(s); converged valid HR@10 {ttq['converged_hr@10']:.4f}, target "
             f"{ttq['target_hr@10']:.4f}):", "", "| run | epoch | seconds | valid HR@10 |", "|---|---:|---:|---:|"]
    for run in ttq["runs"]:
        for p in run["curve"]:
            lines.append(f"| {run['label']} | {p['epoch']} | {p['seconds']:.1f} | {p['valid_hr@10']:.4f} |")
    return lines


def plot(out: Path) -> list[str]:
    """PNGs from train.json: plain-loop throughput vs batch size, and valid HR@10 vs seconds."""
    path = out / "train.json"
    if not path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(path.read_text())
    if "batch_sweep" not in res or "time_to_quality" not in res:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = res["batch_sweep"]
    ax.plot([p["batch_size"] for p in sweep], [p["samples_per_s"] for p in sweep], "o-", label="plain torch loop")
    ax.axhline(res["ray_samples_per_s_per_worker"], ls="--", c="gray",
               label=f"Ray Train 1 worker (batch {res['settings']['batch_per_worker']})")
    ax.set(xscale="log", xlabel="batch size", ylabel="samples/s", title="NeuMF training throughput (CPU)")
    ax.legend()
    written.append(_save(fig, out / "throughput_vs_batch.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in res["time_to_quality"]["runs"]:
        ax.plot([p["seconds"] for p in run["curve"]], [p["valid_hr@10"] for p in run["curve"]], "o-",
                label=run["label"])
    ax.axhline(res["time_to_quality"]["target_hr@10"], ls="--", c="gray", label="converged - 0.01")
    ax.set(xlabel="seconds of Ray Train training", ylabel="valid HR@10", title="Time to quality")
    ax.legend()
    written.append(_save(fig, out / "time_to_quality.png"))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> str:
    with replacing(path) as tmp:  # bench/results/.*.png.tmp is git-ignored
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return str(path)


def write_report(out: Path) -> Path:
    plot(out)
    report = out.parent / "RESULTS.md"
    with replacing(report) as tmp:
        tmp.write_text(render_report(out))
    return report


# ------------------------------------------------------------------------------------------------ entry
def run_bench(name: str, quick: bool, out: str | Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Run one bench (or "all"), write its JSON(s) and regenerate RESULTS.md; returns {name: result}."""
    if name != "all" and name not in RUNNERS:
        raise UserError(f"bench {name!r} is not one of {', '.join((*BENCHES, 'all'))}")
    out_dir = Path(out or (QUICK_OUT if quick else DEFAULT_OUT))
    results = {}
    for n in BENCHES if name == "all" else (name,):
        t0 = time.perf_counter()
        res = runner(n)(quick)
        res.update(name=n, quick=quick, seconds=time.perf_counter() - t0,
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                   command=command or f"ncf-ray bench {n}{' --quick' if quick else ''}")
        write_json(out_dir / f"{n}.json", res)
        write_report(out_dir)
        results[n] = res
    return results


def format_rows(results: dict[str, Any]) -> str:
    lines = []
    for name, res in results.items():
        for r in res["rows"]:
            ratio = f"  ratio {r['ratio']:.3f} vs {r['baseline']} ({_fmt(r['baseline_value'])})" if r["ratio"] else ""
            lines.append(f"{name:>8}  {r['figure']}: {_fmt(r['value'])} {r['unit']}{ratio}")
    return "\n".join(lines)
