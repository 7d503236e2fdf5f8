"""The Ray-free GPU benchmark entry (`python -m ncf_ray.bench.gpu`) on CPU with a tiny synthetic set (no Ray, no
files), and the bench package's promise that importing it loads no Ray."""

import json
import subprocess
import sys

import torch

from ncf_ray.bench import gpu as bench_gpu

TINY = ["--device", "cpu", "--users", "60", "--items", "40", "--positives", "600", "--batch-size", "256",
        "--epochs", "2", "--full-eval-users", "20", "--eval-negatives", "9", "--threads", "1"]


def test_synthetic_positives_are_distinct_and_in_range():
    users, items = bench_gpu.synthetic_positives(50, 30, 400, torch.device("cpu"), seed=1)
    assert users.numel() == 400
    keys = users * 30 + items
    assert torch.unique(keys).numel() == keys.numel()
    assert bool((torch.diff(keys) > 0).all())  # sorted by user then item
    assert 0 <= int(users.min()) and int(users.max()) < 50 and 0 <= int(items.min()) and int(items.max()) < 30


def test_hold_out_one_takes_one_positive_per_eligible_user():
    users = torch.tensor([0, 0, 0, 1, 2, 2])
    items = torch.tensor([3, 5, 7, 1, 2, 4])
    split = bench_gpu.hold_out_one(users, items)
    assert split["eval_users"].tolist() == [0, 2]  # user 1 has one positive: it stays in train
    assert split["eval_items"].tolist() == [3, 2]
    assert list(zip(split["train_users"].tolist(), split["train_items"].tolist())) == [(0, 5), (0, 7), (1, 1), (2, 4)]


def test_bench_gpu_amp_and_text_output(capsys):
    assert bench_gpu.main([*TINY, "--epochs", "1", "--amp", "--model", "gmf", "--factors", "8"]) == 0
    assert "samples/s" in capsys.readouterr().out


def test_bench_gpu_runs_on_cpu_reports_positive_figures_and_never_imports_ray():
    # The lent GPU machine has no Ray: the entry and everything it imports must stay Ray-free. Run it in a fresh
    # process (not just import it): serving() imports ncf_ray.scoring lazily, and this process may have Ray loaded.
    code = ("import json, sys, ncf_ray.bench.gpu as b; "
            f"assert b.main({[*TINY, '--json']!r}) == 0; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow', 'pandas')); "
            "print(json.dumps(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *_, printed, bad = proc.stdout.strip().splitlines()
    assert json.loads(bad) == []
    out = json.loads(printed)
    assert out["device"] == "cpu"
    for key in ("train_samples_per_s", "epoch_samples_per_s", "seconds_per_epoch", "eval_sampled_users_per_s",
                "eval_full_users_per_s", "samples_per_epoch", "n_train_positives", "serve_top10_users_per_s_fp32",
                "serve_top10_users_per_s_auto"):
        assert out[key] > 0, key
    assert len(out["epochs"]) == 2
    assert all(e["loss"] > 0 for e in out["epochs"])
    assert 0.0 <= out["valid_hr@10"] <= 1.0
    assert out["serve_precision_fp32"] == "fp32" and out["serve_precision_auto"] in ("bf16", "fp32")


def test_bench_package_loads_no_ray_and_every_bench_has_a_measure_entry():
    # `ncf-ray bench --help` and the GPU entry import the package: its runner loads a bench only when it runs it.
    code = ("import sys, ncf_ray.bench as b; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'ray'); "
            "entries = {n: b.runner(n) for n in b.BENCHES}; "
            "assert all(callable(f) and f.__name__ == 'measure' for f in entries.values()), entries; "
            "assert {f.__module__ for f in entries.values()} == {f'ncf_ray.bench.{n}' for n in b.BENCHES}; "
            "print('ray imported by the package:', bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
