"""The console without Ray: the epoch table's rows and event lines, trial rows, the sweep plan, the log routing
of a session, and where `--verbose` may go on the command line."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest

from ncf_ray import console
from ncf_ray.cli import build_parser, log_dir_for


def _row(epoch, hr, best_epoch, best_hr, k=10):
    return {"epoch": epoch, "loss": 0.5, f"valid_hr@{k}": hr, f"valid_ndcg@{k}": hr / 2,
            "samples_per_second": 1234.0, "epoch_seconds": 0.25, "best_epoch": best_epoch, "best_valid_hr": best_hr}


def test_epoch_table_prints_the_header_once_and_a_row_per_epoch():
    out: list[str] = []
    table = console.EpochTable(epochs=3, k=10, patience=2, write=out.append)
    for e, hr in enumerate([0.2, 0.3, 0.35], 1):
        table.add(_row(e, hr, e, hr))
    table.close()
    assert out[0] == console.EPOCH_HEADER and out.count(console.EPOCH_HEADER) == 1
    assert [line.split()[0] for line in out[1:]] == ["1", "2", "3"]
    assert out[2].split()[2] == "0.3000" and out[2].split()[4] == "1,234"
    assert not any("early stop" in line for line in out)  # ran every planned epoch


def test_epoch_table_infers_early_stop_from_the_last_report():
    out: list[str] = []
    table = console.EpochTable(epochs=10, k=10, patience=2, write=out.append)
    for e, (hr, best_e) in enumerate([(0.3, 1), (0.2, 1), (0.25, 1)], 1):
        table.add(_row(e, hr, best_e, 0.3))
    table.close()
    assert out[-1].startswith("early stop after epoch 3") and "2 epochs" in out[-1] and "epoch 1" in out[-1]


def test_epoch_table_says_when_a_run_resumes_or_restarts():
    out: list[str] = []
    table = console.EpochTable(epochs=5, k=5, patience=9, write=out.append)
    table.add(_row(3, 0.4, 3, 0.4, k=5))  # resumed: the first report is epoch 3
    table.add(_row(4, 0.4, 3, 0.4, k=5))
    table.add(_row(4, 0.4, 3, 0.4, k=5))  # a worker-group restart from epoch 3's checkpoint repeats epoch 4
    assert out[0].startswith("resumed from the checkpoint of epoch 2")
    assert out[1] == console.EPOCH_HEADER
    assert out[4].startswith("restarted from the checkpoint of epoch 3") and out[5].split()[0] == "4"


def test_trial_rows():
    row = console.format_trial_row("a1b2c3", {"factors": 8, "depth": 1, "lr": 3e-3, "negatives": 4},
                                   {"epoch": 1, "best_valid_hr": 0.5, "best_valid_ndcg": 0.25}, max_epochs=3)
    assert row.split()[:3] == ["a1b2c3", "8", "1"] and "0.5000" in row and row.endswith("stopped early (ASHA)")
    assert console.format_trial_row("x", {}, {"epoch": 3}, 3).endswith(" done")
    assert console.format_trial_row("x", {}, {}, 3, error=True).endswith(" error")
    # A sequence sweep shows what it searches: history length, blocks, dropout, under its own header.
    seq = console.format_trial_row("s1", {"factors": 64, "history_len": 200, "blocks": 2, "dropout": 0.25,
                                          "lr": 1e-3}, {"epoch": 3, "best_valid_hr": 0.8}, 3, family="seq")
    assert seq.split()[:5] == ["s1", "64", "200", "2", "0.25"] and seq.endswith(" done")
    assert console.trial_header("seq").split()[:5] == ["trial", "factors", "L", "blk", "drop"]
    assert len(console.trial_header("seq")) == len(seq) - len(" done") + len(" status")


def test_session_routes_ray_loggers_and_warnings_to_the_file_and_restores_them(tmp_path, capsys):
    ray_data = logging.getLogger("ray.data.test_console")
    console_handler = logging.StreamHandler(sys.stderr)
    ray_data.addHandler(console_handler)
    said: list[str] = []
    try:
        with console.session(tmp_path / "logs", "unit", announce=said.append) as path:
            assert not path.parent.exists()  # nothing on disk until something is logged
            with console.session(tmp_path / "other", "nested") as inner:
                assert inner == path  # a stage's own session is a no-op inside the command's
            ray_data.warning("ray data says hello")
            logging.getLogger("ray").info("ray info line")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)
            console.announce_log()
            console.announce_log()
        text = path.read_text()
        assert "ray data says hello" in text and "ray info line" in text and "something is deprecated" in text
        assert said == [f"log: {path}  (Ray's output; --verbose shows it here too)"]
        captured = capsys.readouterr()
        assert "hello" not in captured.err + captured.out and "deprecated" not in captured.err
        assert console_handler in ray_data.handlers  # restored when the session ended
    finally:
        ray_data.removeHandler(console_handler)


def test_verbose_session_keeps_the_console_too(tmp_path, capsys):
    lg = logging.getLogger("ray.serve.test_console")
    h = logging.StreamHandler(sys.stderr)
    lg.addHandler(h)
    try:
        with console.session(tmp_path, "v", verbose=True, announce=None) as path:
            lg.warning("serve says hi")
        assert "serve says hi" in capsys.readouterr().err and "serve says hi" in path.read_text()
    finally:
        lg.removeHandler(h)


@pytest.mark.parametrize("argv", [["--verbose", "train", "d", "--out", "o"], ["train", "d", "--out", "o", "-v"]])
def test_verbose_flag_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True


def test_log_dirs(tmp_path):
    p = build_parser()
    assert log_dir_for(p.parse_args(["train", "d", "--out", "run"])).as_posix() == "run/logs"
    assert log_dir_for(p.parse_args(["prepare", "synthetic", "--out", str(tmp_path / "ds")])) == tmp_path / "ds.logs"
    assert log_dir_for(p.parse_args(["serve", str(tmp_path / "run" / "model")])) == tmp_path / "run" / "logs"
    assert log_dir_for(p.parse_args(["recommend", "m", "--user", "1"])) is None
    assert p.parse_args(["train", "d", "--out", "o"]).verbose is False
