"""jobs/*.py through `pipeline.run_job`: a user mistake is one `error:` line and exit 2; a bug keeps its
traceback and exits 1 (no Ray is started: each failure happens before a stage reaches Ray)."""

import importlib.util
from pathlib import Path

import pytest

from ncf_ray.pipeline import run_job

ROOT = Path(__file__).resolve().parents[2]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    rc = run_job(_job("train").main, [str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path, capsys, monkeypatch):
    import ncf_ray.train

    def broken_stage(*args, **kwargs):
        raise RuntimeError("ArrowInvalid: looks like a file problem but is a bug in the stage")

    monkeypatch.setattr(ncf_ray.train, "run_training", broken_stage)
    rc = run_job(_job("train").main, [str(tmp_path / "ds"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "in broken_stage" in err
    assert "RuntimeError: ArrowInvalid: looks like a file problem" in err


def test_pipeline_job_refuses_sizes_it_would_ignore(tmp_path, capsys):
    rc = run_job(_job("pipeline").main, ["--out", str(tmp_path / "o"), "--source", "logs.csv", "--users", "50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --users only apply to --source synthetic or synthetic-shop, not 'logs.csv'"]
    assert not (tmp_path / "o").exists()


def test_train_job_has_one_storage_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_job(_job("train").main, ["ds", "--out", "run", "--storage-path", "x"])
    assert exc.value.code == 2 and "--storage-path" in capsys.readouterr().err
