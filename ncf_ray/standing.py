"""A Ray Train worker group kept up across updates, so a stream of small updates pays the group's start once.

`ncf-ray update` trains each child on a fresh TorchTrainer (`update.fit_update`): right for one update, but the
worker group's start (~15-20 s here) dwarfs the training of a day's log. `jobs/continual.py` applies update after
update, so it starts one `StandingTrainer` and hands each update to it:

    runner = StandingTrainer()           # nothing starts yet
    run_update(..., runner=runner)       # first call: TorchTrainer(standing_loop).fit() in a thread, then the job
    run_update(..., runner=runner)       # the same workers take the next job
    runner.close()                       # the workers leave their loop and the run ends

The driver and the workers meet at a `_Broker` actor. `submit` queues a job (the update's TrainConfig and an
object ref of its inputs); every worker blocks in `take` until a job newer than its last one is there, builds the
child model from the inputs, wraps it for DDP (`prepare_model`, the group's process group), runs
`update.train_update` (the same epochs and steps as `fit_update`), and rank 0 hands back {"model", "history",
"optimizer"} with `finish`. A worker that dies mid-job is restarted by Ray Train (FailureConfig) and takes the
unfinished job again; a UserError in a job (nothing to train on) is that job's one-line answer, and the group restarts for the
next; a run that ends in an error fails the waiting job with that error. A job whose workers or GPU setting
differ from the group's restarts the group with the new shape.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from typing import Any

import torch

from ncf_ray.config import TrainConfig, from_dict, to_dict
from ncf_ray.errors import UserError

MAX_FAILURES = 2


def _broker_class() -> Any:
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class _Broker:
        """Jobs in, results out; workers wait in `take`, the driver in `result`."""

        def __init__(self) -> None:
            self.jobs: dict[int, tuple[dict[str, Any], Any]] = {}
            self.results: dict[int, Any] = {}
            self.last = 0
            self.stopped = False
            self.error: str | None = None
            self.cond = asyncio.Condition()

        async def submit(self, cfg: dict[str, Any], inputs: list[Any]) -> int:
            async with self.cond:
                self.last += 1
                self.jobs[self.last] = (cfg, inputs[0])  # inputs: [ObjectRef], so the ref is not resolved here
                self.cond.notify_all()
                return self.last

        async def take(self, after: int) -> tuple[int, dict[str, Any], list[Any]] | None:
            """The oldest job after `after` not yet finished (a restarted worker passes 0 and gets the one its
            predecessor left), or None once stopped."""
            def ready() -> bool:
                return self.stopped or any(j > after for j in self.jobs)

            async with self.cond:
                await self.cond.wait_for(ready)
                if self.stopped:
                    return None
                j = min(j for j in self.jobs if j > after)
                cfg, ref = self.jobs[j]
                return j, cfg, [ref]

        async def finish(self, job: int, result: dict[str, Any]) -> None:
            async with self.cond:
                self.jobs.pop(job, None)
                self.results[job] = result
                self.cond.notify_all()

        async def fail(self, message: str) -> None:
            async with self.cond:
                self.error, self.stopped = message, True
                self.cond.notify_all()

        async def stop(self) -> None:
            async with self.cond:
                self.stopped = True
                self.cond.notify_all()

        async def result(self, job: int) -> tuple[dict[str, Any] | None, str | None]:
            async with self.cond:
                await self.cond.wait_for(lambda: job in self.results or self.error is not None or
                                         (self.stopped and job in self.jobs))
                if job in self.results:
                    return self.results.pop(job), None
                return None, self.error or "the standing worker group stopped before the job ran"

    return _Broker


def standing_loop(config: dict[str, Any]) -> None:
    """One worker of the standing group: take a job, train it under DDP, rank 0 returns the weights; repeat."""
    import ray
    import ray.train
    import ray.train.torch

    from ncf_ray.train import default_threads
    from ncf_ray.update import model_for_inputs, train_update

    broker = config["broker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    done = 0
    while True:
        job = ray.get(broker.take.remote(done))
        if job is None:
            return
        done, cfg_dict, (ref,) = job
        if cfg_dict is None:  # start()'s ping: the group is up
            if rank == 0:
                ray.get(broker.finish.remote(done, {}))
            continue
        cfg = from_dict(TrainConfig, cfg_dict)
        torch.set_num_threads(cfg.threads_per_worker or default_threads(ctx.get_local_world_size()))
        torch.manual_seed(cfg.seed)
        inputs = ray.get(ref)
        model = ray.train.torch.prepare_model(model_for_inputs(cfg, inputs))
        try:
            history, optimizer = train_update(model, inputs, cfg, device, rank, world)
        except UserError as exc:
            # The job's answer is this one line; the group then restarts (another rank may be in a collective).
            ray.get(broker.finish.remote(done, {"error": str(exc)}))
            raise
        if rank == 0:
            from ncf_ray.update import unwrap_model

            state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
            ray.get(broker.finish.remote(done, {"model": state, "history": history, "optimizer": optimizer}))
        del model, inputs


class StandingTrainer:
    """The `runner` of `update.train_child` for a stream of updates (module docstring)."""

    def __init__(self, storage: str | None = None) -> None:
        self.storage = storage
        self.shape: tuple[int, bool] | None = None
        self.broker: Any = None
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}
        self.starts = 0

    def _start(self, workers: int, gpu: bool) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.train.v2.api.config import LoggingConfig

        from ncf_ray.train import check_fits_cluster

        check_fits_cluster(workers, gpu)
        self.broker = _broker_class().remote()
        storage = self.storage or tempfile.mkdtemp(prefix="ncf-ray-standing-")
        trainer = TorchTrainer(
            standing_loop, train_loop_config={"broker": self.broker},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu),
            run_config=ray.train.RunConfig(name=f"standing-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                           failure_config=ray.train.FailureConfig(max_failures=MAX_FAILURES),
                                           logging_config=LoggingConfig(log_level="WARNING")))
        broker, outcome = self.broker, {}

        def fit() -> None:
            try:
                result = trainer.fit()
                error = result.error
            except Exception as exc:  # noqa: BLE001 - handed to the waiting job, which re-raises it
                error = exc
            if error is not None:
                outcome["error"] = error
                ray.get(broker.fail.remote(f"{type(error).__name__}: {error}"))

        self.outcome = outcome
        self.thread = threading.Thread(target=fit, name="ncf-ray-standing", daemon=True)
        self.thread.start()
        self.shape = (workers, gpu)
        self.starts += 1

    def start(self, workers: int = 1, gpu: bool = False) -> float:
        """Start the group now and wait until it takes jobs (a no-op job); returns the seconds that took. A later update with this shape reuses it (one with another shape restarts it)."""
        import time

        t0 = time.perf_counter()
        if self.shape != (workers, gpu):
            self.close()
            self._start(workers, gpu)
        self._run(None, None)
        return time.perf_counter() - t0

    def _run(self, cfg: dict[str, Any] | None, inputs: dict[str, Any] | None) -> dict[str, Any]:
        import ray

        from ncf_ray.train import raise_user_error_from

        job = ray.get(self.broker.submit.remote(cfg, [None if inputs is None else ray.put(inputs)]))
        result, error = ray.get(self.broker.result.remote(job))
        if result is not None and "error" in result:
            raise UserError(result["error"])
        if result is None:
            raise_user_error_from(self.outcome.get("error"))  # a worker's UserError: one line
            self.shape = None  # the group is gone: the next call starts a new one
            raise RuntimeError(f"update training failed: {error}")
        return result

    def __call__(self, cfg: TrainConfig, inputs: dict[str, Any], storage: str | None = None) -> dict[str, Any]:
        if self.shape != (cfg.workers, cfg.gpu):
            self.close()
            self._start(cfg.workers, cfg.gpu)
        return self._run(to_dict(cfg), inputs)
    def close(self) -> None:
        """End the workers' loop and wait for the run to finish (a no-op when nothing started)."""
        import ray

        if self.broker is not None:
            ray.get(self.broker.stop.remote())
            if self.thread is not None:
                self.thread.join()
            ray.kill(self.broker)
        self.broker, self.thread, self.shape = None, None, None

    def __enter__(self) -> StandingTrainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
