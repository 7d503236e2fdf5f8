"""What a command prints, and where Ray's own output goes.

By default a command prints its own lines once: one row per epoch (or per trial), a tqdm bar on a terminal, the
closing table. Everything Ray says (its loggers, Python warnings, and the stdout/stderr that Ray forwards from
workers and actors: the Train controller, Ray Data's coordinators, Serve's controller and proxies) goes to one
log file, `<dir>/logs/<command>-<time>.log`, whose path the command prints first. `--verbose` sends it to the
console as well.

    with console.session(Path(out) / "logs", "train", verbose=False):   # cli.main and demo.py open one
        ...                                                            # stages nest their own: a no-op here

Pieces: `session` (the log file and the routing), `reroute` (re-applied after Ray, Ray Data or Serve add their
console handlers), `attach_worker_logs` (called by runtime.ensure_ray once Ray is up), `EpochTable` and
`epoch_feed` (the training table, driven from the workers' reports on the driver), `trial_printer` (a Tune
callback: one row per finished trial).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EPOCH_HEADER = f"{'epoch':>5} {'loss':>8} {'valid_hr':>9} {'valid_ndcg':>10} {'samples/s':>12} {'sec':>7}"
EPOCH_ROW = "{epoch:>5} {loss:>8.4f} {hr:>9.4f} {ndcg:>10.4f} {sps:>12,.0f} {secs:>7.1f}"
# The sampled parameters a trial row shows: (config key, header, width, number format or "" for as-is); the
# sequence family searches other keys than the ID families.
TRIAL_COLUMNS = {
    "default": (("factors", "factors", 7, ""), ("depth", "depth", 5, ""), ("lr", "lr", 9, "9.2e"),
                ("negatives", "neg", 4, "")),
    "seq": (("factors", "factors", 7, ""), ("history_len", "L", 4, ""), ("blocks", "blk", 3, ""),
            ("dropout", "drop", 5, "5.2f"), ("lr", "lr", 9, "9.2e")),
}


def _trial_columns(family: str) -> tuple[tuple[str, str, int, str], ...]:
    return TRIAL_COLUMNS.get(family, TRIAL_COLUMNS["default"])


def trial_header(family: str = "") -> str:
    """The header of `format_trial_row`'s rows for a sweep of `family`."""
    cols = " ".join(f"{head:>{width}}" for _, head, width, _ in _trial_columns(family))
    return f"{'trial':<12} {cols} {'valid_hr':>9} {'ndcg':>7} {'ep':>3} status"


TRIAL_HEADER = trial_header()
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LOGGER = "ncf_ray.ray_output"  # lines Ray forwards from workers and actors, written to the log file
_ROUTED = ("ray", "py.warnings", WORKER_LOGGER)  # plus every "ray.*" logger that has handlers of its own


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler that creates its directory and file on the first record, so a command that fails before
    Ray starts (a user mistake) leaves no logs/ dir behind."""

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@dataclass
class _Session:
    path: Path
    verbose: bool
    handler: logging.Handler
    announce: Callable[[str], None] | None
    saved: dict[str, tuple[list[logging.Handler], int, bool]] = field(default_factory=dict)
    announced: bool = False


_SESSION: _Session | None = None
_LOCK = threading.Lock()


def active() -> _Session | None:
    """The open console session, or None (then Ray prints as it always does)."""
    return _SESSION


def verbose() -> bool:
    return bool(_SESSION and _SESSION.verbose)


@contextlib.contextmanager
def session(log_dir: str | Path, name: str, verbose: bool = False,
            announce: Callable[[str], None] | None = print) -> Iterator[Path]:
    """Route Ray's output to the log file `log_dir/<name>-<UTC time>.log` (and to the console too with
    `verbose`) until the block ends. The file (and its dir) appear with the first record; its path is printed
    (via `announce`) once Ray starts (`announce_log`, called by runtime.ensure_ray), so commands that never
    start Ray print and create nothing. Inside an open session this is a no-op that yields the open session's
    file, so stages open one for callers that did not."""
    global _SESSION
    if _SESSION is not None:
        yield _SESSION.path
        return
    path = Path(log_dir).resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    handler = _LazyFileHandler(path, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    with _LOCK:
        _SESSION = _Session(path=path, verbose=verbose, handler=handler, announce=announce)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> the file
    reroute()
    try:
        yield _SESSION.path
    finally:
        with _LOCK:
            s, _SESSION = _SESSION, None
        for name_, (handlers, level, propagate) in s.saved.items():
            lg = logging.getLogger(name_)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        logging.captureWarnings(False)
        handler.close()


def announce_log() -> None:
    """Print the session's log path, once per session (runtime.ensure_ray calls it when Ray is up)."""
    s = _SESSION
    if s is None or s.announced:
        return
    s.announced = True
    logging.getLogger(WORKER_LOGGER).info("log of this command's Ray output")  # the file exists once announced
    if s.announce is not None:
        s.announce(f"log: {s.path}" + ("" if s.verbose else "  (Ray's output; --verbose shows it here too)"))
        sys.stdout.flush()


def _is_console(h: logging.Handler) -> bool:
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def reroute() -> None:
    """(Re)apply the session's routing to Ray's loggers: each gets the log file, and loses its console handlers
    unless verbose. Ray Data and Serve add their own console handlers when they are imported or started, so
    runtime.ensure_ray and serve.run_server call this again afterwards. Idempotent; a no-op outside a session."""
    s = _SESSION
    if s is None:
        return
    names = set(_ROUTED)
    names.update(n for n, lg in logging.root.manager.loggerDict.items()
                 if n.startswith("ray.") and isinstance(lg, logging.Logger) and lg.handlers)
    for n in sorted(names):
        lg = logging.getLogger(n)
        if n not in s.saved:
            s.saved[n] = (list(lg.handlers), lg.level, lg.propagate)
        keep = [h for h in lg.handlers if h is not s.handler and (s.verbose or not _is_console(h))]
        if n == "py.warnings" and s.verbose and not any(_is_console(h) for h in keep):
            keep.append(logging.StreamHandler(sys.stderr))
        lg.handlers[:] = [*keep, s.handler]
        lg.propagate = False  # each routed logger writes the file itself, once
        if n in ("ray", WORKER_LOGGER) or lg.level == logging.NOTSET:
            lg.setLevel(logging.INFO)
    s.handler.setFormatter(logging.Formatter(LOG_FORMAT))  # ray.init re-formats the "ray" logger's handlers


# ------------------------------------------------------------------------------------------- worker output
def can_route_worker_logs() -> bool:
    """Whether this Ray has the driver-side dispatcher of forwarded worker output (ray._private, 2.60)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher  # noqa: F401
        from ray._private.worker import print_to_stdstream  # noqa: F401
    except ImportError:
        return False
    return True


def attach_worker_logs() -> bool:
    """Send what Ray prints on the driver for other processes to the session's log file instead of the console
    (both with verbose): the workers' and actors' forwarded stdout/stderr (log_to_driver=True) and the error
    notices the raylet pushes to the driver ("(raylet) Task ... failed ..."). Both go through
    ray._private.worker.print_to_stdstream, which this wraps. Outside a session when a line arrives, Ray's own
    printer runs, so a Ray that outlives the session prints as usual. Returns False when there is nothing to
    attach to (log_to_driver off, or a Ray without these internals)."""
    if not can_route_worker_logs():
        return False
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(n == "ray_print_logs" for n, _ in dispatcher.handlers):
        return False
    routed = ray_worker.print_to_stdstream
    if not getattr(routed, "_ncf_ray", False):
        ray_print = routed
        out = logging.getLogger(WORKER_LOGGER)

        def routed(data: dict[str, Any], ignore_prefix: bool) -> None:
            s = _SESSION
            if s is None or s.verbose:
                ray_print(data, ignore_prefix)
            if s is not None:
                who = data.get("actor_name") or data.get("task_name") or ""
                prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
                for line in data.get("lines", ()):
                    out.log(logging.WARNING if data.get("is_err") else logging.INFO, "%s %s", prefix, line)

        routed._ncf_ray = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = routed  # looked up at call time by the raylet-error listener
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    dispatcher.remove_handler("ray_print_logs")  # under the same name, which Ray removes at disconnect
    dispatcher.add_handler("ray_print_logs", functools.partial(routed, ignore_prefix=ignore_prefix))
    return True


# ------------------------------------------------------------------------------------------- progress
def _bar(total: int | None, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr that shows only on a terminal (disable=None) and leaves no line behind."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None, file=sys.stderr, dynamic_ncols=True)


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)  # above any live bar
    sys.stdout.flush()


class EpochTable:
    """The training table on the driver: the header once, one row per epoch report, a line when a run resumes
    or restarts from a checkpoint, and one when it stopped early; a tqdm bar over epochs.

    `add(row)` takes rank 0's report (the `row` dict of train.train_loop_per_worker: epoch, loss,
    valid_hr@K, valid_ndcg@K, samples_per_second, epoch_seconds, best_epoch, best_valid_hr); `close()` ends it.
    Early stop is inferred from the last report: fewer epochs than planned and `patience` epochs since the best."""

    def __init__(self, epochs: int, k: int, patience: int, write: Callable[[str], None] = _write) -> None:
        self.epochs, self.k, self.patience, self.write = epochs, k, patience, write
        self.last: dict[str, Any] | None = None
        self._bar: Any = None

    def add(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if self.last is None:
            if self._bar is None and self.write is _write:
                self._bar = _bar(self.epochs, "epochs", "epoch")
            if epoch > 1:
                self.write(f"resumed from the checkpoint of epoch {epoch - 1} "
                           f"(best valid hr@{self.k} so far {row.get('best_valid_hr', float('nan')):.4f})")
            self.write(EPOCH_HEADER)
        elif epoch <= int(self.last["epoch"]):
            self.write(f"restarted from the checkpoint of epoch {epoch - 1} (the worker group was restarted)")
        self.write(EPOCH_ROW.format(epoch=epoch, loss=row["loss"], hr=row[f"valid_hr@{self.k}"],
                                    ndcg=row[f"valid_ndcg@{self.k}"], sps=row["samples_per_second"],
                                    secs=row["epoch_seconds"]))
        self.last = row
        if self._bar is not None:
            self._bar.n = epoch
            self._bar.refresh()

    def stopped_early(self) -> bool:
        last = self.last
        return bool(last and int(last["epoch"]) < self.epochs
                    and int(last["epoch"]) - int(last.get("best_epoch", last["epoch"])) >= self.patience)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.stopped_early():
            last = self.last
            self.write(f"early stop after epoch {last['epoch']}: valid hr@{self.k} has not improved for "
                       f"{self.patience} epochs (best {last['best_valid_hr']:.4f} at epoch {last['best_epoch']})")


class _Inbox:
    """A tiny actor holding reports until the driver takes them (the Train controller runs in its own actor,
    so its callbacks cannot print on the driver's console)."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def put(self, row: dict[str, Any]) -> None:
        self._rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self._rows = self._rows, []
        return rows


@functools.lru_cache(maxsize=1)
def _forwarder_class() -> type:
    """The ray.train.UserCallback that forwards rank 0's reports to an _Inbox (defined on first use, so
    importing this module does not import Ray Train)."""
    from ray.train import UserCallback

    class ReportForwarder(UserCallback):
        def __init__(self, inbox: Any) -> None:
            self.inbox = inbox

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metrics[0]:
                self.inbox.put.remote(dict(metrics[0]))  # fire and forget: calls from one caller stay in order

    return ReportForwarder


@contextlib.contextmanager
def epoch_feed(table: EpochTable, poll_s: float = 0.25) -> Iterator[Any]:
    """Yield a Ray Train callback for `RunConfig(callbacks=[...])` that feeds `table` on the driver while the
    block runs (a thread polls the inbox actor); the table is drained and closed when the block ends."""
    import ray

    inbox = ray.remote(num_cpus=0)(_Inbox).remote()
    stop = threading.Event()

    def pump() -> None:
        while True:
            done = stop.is_set()
            try:
                for row in ray.get(inbox.take.remote()):
                    table.add(row)
            except Exception as exc:  # the console must never fail a run; the log keeps the reason
                logging.getLogger(WORKER_LOGGER).warning("epoch table: %s", exc)
                return
            if done:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=pump, name="ncf-ray-epoch-table", daemon=True)
    thread.start()
    try:
        yield _forwarder_class()(inbox)
    finally:
        stop.set()
        thread.join(timeout=30)
        table.close()
        ray.kill(inbox)


# ------------------------------------------------------------------------------------------- tune
def format_trial_row(trial_id: str, config: dict[str, Any], result: dict[str, Any], max_epochs: int,
                     error: bool = False, family: str = "") -> str:
    """One finished trial: its sampled parameters (the columns of `trial_header(family)`), best valid HR/NDCG,
    epochs run and how it ended."""
    def num(x: Any, fmt: str) -> str:  # a missing value keeps the column's width
        return format(float(x), fmt) if isinstance(x, (int, float)) else f"{'-':>{int(fmt.split('.')[0])}}"

    def cell(key: str, width: int, fmt: str) -> str:
        value = config.get(key)
        return num(value, fmt) if fmt else f"{str('-' if value is None else value):>{width}}"

    epochs = int(result.get("epoch", 0) or 0)
    status = "error" if error else ("done" if epochs >= max_epochs else "stopped early (ASHA)")
    cols = " ".join(cell(key, width, fmt) for key, _, width, fmt in _trial_columns(family))
    return (f"{trial_id:<12} {cols} {num(result.get('best_valid_hr'), '9.4f')} "
            f"{num(result.get('best_valid_ndcg'), '7.4f')} {epochs:>3} {status}")


def trial_printer(total: int | None, max_epochs: int, write: Callable[[str], None] = _write,
                  label: str = "") -> Any:
    """A ray.tune.Callback (runs on the driver) printing the trial header once (naming `label`, the model family,
    when given), one row per finished or failed trial, and a tqdm bar over `total` trials (None: unknown)."""
    from ray.tune import Callback

    class TrialPrinter(Callback):
        def __init__(self) -> None:
            self.rows = 0
            self.bar: Any = None

        def _row(self, trial: Any, error: bool) -> None:
            if self.rows == 0:
                write(f"{trial_header(label)}  ({label} trials)" if label else TRIAL_HEADER)
            self.rows += 1
            write(format_trial_row(trial.trial_id, trial.config or {}, trial.last_result or {}, max_epochs, error,
                                   label))
            if self.bar is not None:
                self.bar.update(1)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if self.bar is None and write is _write:
                self.bar = _bar(total, "trials", "trial")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._row(trial, error=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._row(trial, error=True)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrialPrinter()
