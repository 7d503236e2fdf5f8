"""Serving benchmark: requests/s, p50, p99 and errors of the Serve endpoint under concurrent keep-alive load.

    ncf-ray bench serve [--quick]          # the table rows in bench/RESULTS.md (calls `measure`)
    python -m ncf_ray.bench.serve [MODEL_DIR] [--quick] [--replicas 2]     # the raw figures, printed

One run starts Serve (HAProxy ingress unless Ray is already up), deploys the model app and a no-op endpoint (the
floor: what Serve itself costs per request), and drives each from a SEPARATE process on loopback: a small asyncio
HTTP/1.1 client holding `connections` keep-alive connections, one request in flight on each (like `wrk -c16`).
Measured: POST /recommend top-10 over all items, POST /recommend/batch (users/s; at the endpoint's maximum of
1,000 users per request, as a bulk client sends, and at 256) and the no-op floor; then the same deployment is
reconfigured to exact fp32 scoring and /recommend and the 1,000-user batch are measured again as the baseline.

Without MODEL_DIR it builds an ML-1M-size NeuMF artifact (6,040 users x 3,706 items, factors 32, layers 64,32,16,
~165 seen items per user) from an initialised, untrained model: serving speed does not depend on the weights.
`bench_serve` and this module's command line write no result file; `ncf-ray bench serve` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

from ncf_ray.bench import row, run_module

BENCH_APP, NOOP_APP = "ncf_bench", "ncf_noop"
ML1M = {"n_users": 6040, "n_items": 3706, "factors": 32, "layers": (64, 32, 16), "seen_per_user": 165}
TINY = {"n_users": 300, "n_items": 200, "factors": 8, "layers": (16, 8), "seen_per_user": 20}


# ------------------------------------------------------------------------------------------------ artifact
def make_bench_artifact(out_dir: str, n_users: int, n_items: int, factors: int, layers: tuple[int, ...],
                        seen_per_user: int, seed: int = 0, seq_history: int = 0) -> str:
    """An artifact with a freshly initialised NeuMF (or, with `seq_history` = L > 0, a 2-block seq model reading
    the last L items), ids "1".."n", random seen sets as the stored histories; returns model_version."""
    import numpy as np
    import pandas as pd
    import torch

    from ncf_ray.artifact import save_artifact
    from ncf_ray.batch import Histories
    from ncf_ray.config import ModelConfig
    from ncf_ray.model import model_from_config

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = (ModelConfig(name="seq", factors=2 * factors, layers=(), history_len=seq_history, dropout=0.2)
           if seq_history else ModelConfig(name="neumf", factors=factors, layers=tuple(layers)))
    seen_per_user = min(seen_per_user, n_items)
    indices = np.concatenate([np.sort(rng.choice(n_items, seen_per_user, replace=False)) for _ in range(n_users)])
    indptr = np.arange(n_users + 1, dtype=np.int64) * seen_per_user
    counts = np.bincount(indices, minlength=n_items).astype(np.int64)
    users = pd.DataFrame({"user_idx": np.arange(n_users, dtype=np.int32),
                          "user_id": [str(i + 1) for i in range(n_users)],
                          "count": np.full(n_users, seen_per_user, dtype=np.int64)})
    items = pd.DataFrame({"item_idx": np.arange(n_items, dtype=np.int32),
                          "item_id": [str(i + 1) for i in range(n_items)], "count": counts})
    meta = {"source": "bench_serve (untrained model, random seen sets)", "n_users": n_users, "n_items": n_items}
    histories = Histories(torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64)))
    return save_artifact(out_dir, model_from_config(cfg, n_users, n_items), cfg, n_users, n_items, users, items,
                         indptr, indices, counts.astype(np.float64), {"note": "untrained"}, meta, histories=histories)


# ------------------------------------------------------------------------------------------------ load generator
async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:] if ln)}
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _connection(host: str, port: int, requests: list[bytes], offset: int, start: float, end: float,
                      lat: list[float], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = offset
    while (now := time.perf_counter()) < end:
        writer.write(requests[i % len(requests)])
        i += 1
        try:
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            errors.append(type(exc).__name__)
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            continue
        done = time.perf_counter()
        if status != 200:
            errors.append(str(status))
        elif now >= start:  # requests sent during the warm-up are not counted
            lat.append(done - now)
    writer.close()


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = spec["host"], spec["port"], spec["path"]
    requests = [
        (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()
        for body in spec["bodies"]
    ]
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    start, end = t0 + spec["warmup_s"], t0 + spec["warmup_s"] + spec["seconds"]
    n = spec["connections"]
    await asyncio.gather(*(_connection(host, port, requests, c * 7919, start, end, lat, errors)
                           for c in range(n)))
    lat.sort()

    def q(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "rps": len(lat) / spec["seconds"], "p50_ms": q(0.50), "p99_ms": q(0.99),
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5], "connections": n,
            "seconds": spec["seconds"]}


def load_main() -> None:
    """Entry of the load process: a JSON spec on stdin, a JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    try:
        import uvloop  # the client's own overhead matters on 2 cores: uvloop roughly halves it

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_drive(spec))))


def run_load(host: str, port: int, path: str, bodies: list[str], connections: int, seconds: float,
             warmup_s: float = 1.0) -> dict[str, Any]:
    """Drive `path` from a separate process; returns rps, p50_ms, p99_ms, errors."""
    spec = {"host": host, "port": port, "path": path, "bodies": bodies, "connections": connections,
            "seconds": seconds, "warmup_s": warmup_s}
    return run_module("ncf_ray.bench.serve", ["--load"], "load generator", stdin=json.dumps(spec),
                      timeout=seconds + warmup_s + 60)


# ------------------------------------------------------------------------------------------------ serve side
def _noop_app() -> Any:
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=128)
    class Noop:
        async def __call__(self, request: Any) -> Response:
            return Response(b"{}", media_type="application/json")

    return Noop.bind()


def _batch_bodies(user_ids: list[str], size: int) -> list[str]:
    """/recommend/batch bodies of `size` consecutive users each (one body of all users if there are fewer)."""
    bodies = [json.dumps({"user_ids": user_ids[i: i + size], "k": 10})
              for i in range(0, len(user_ids) - size + 1, size)]
    return bodies or [json.dumps({"user_ids": user_ids, "k": 10})]


def _scoring(host: str, port: int) -> dict[str, Any]:
    """The deployment's scoring precision and note, from GET /bench/model."""
    import httpx

    return httpx.get(f"http://{host}:{port}/bench/model", timeout=10).json()["scoring"]


def _wait_precision(host: str, port: int, precision: str, timeout_s: float = 120.0) -> None:
    """Wait until every replica answers with the given scoring precision (after a reconfigure)."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 8:  # consecutive answers, so both replicas behind the balancer have switched
        try:
            streak = streak + 1 if _scoring(host, port)["precision"] == precision else 0
        except Exception:  # noqa: BLE001 - a replica restarting answers errors meanwhile
            streak = 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not switch to precision {precision} within {timeout_s}s")
        time.sleep(0.1)


def _wait_model(host: str, port: int, family: str, timeout_s: float = 120.0) -> None:
    """Wait until every replica serves a model of `family` (after a reconfigure to another artifact)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 8:  # consecutive answers, so every replica behind the balancer has switched
        try:
            name = httpx.get(f"http://{host}:{port}/bench/model", timeout=10).json()["model"]["name"]
            streak = streak + 1 if name == family else 0
        except Exception:  # noqa: BLE001 - a replica reloading answers errors meanwhile
            streak = 0
        if time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not switch to a {family} model within {timeout_s}s")
        time.sleep(0.1)


def _wait_http(host: str, port: int, path: str, body: str, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            headers = {"content-type": "application/json"}
            if httpx.post(f"http://{host}:{port}{path}", content=body, headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not answer 200 within {timeout_s}s")
        time.sleep(0.25)


def bench_serve(model_dir: str | None, quick: bool, replicas: int = 2, connections: int = 16,
                batch_users: int = 1000, small_batch_users: int = 256, ha_proxy: bool = True) -> dict[str, Any]:
    """Measure the no-op floor, /recommend top-10 and /recommend/batch; return the figures and the settings."""
    import ray
    from ray import serve

    from ncf_ray.artifact import load_artifact
    from ncf_ray.config import ServeConfig
    from ncf_ray.serve import bind_app, start_ray

    seconds = 0.5 if quick else 10.0
    tmp = tempfile.TemporaryDirectory(prefix="ncf-bench-serve-")
    note = None
    seq_dir, seq_len = None, 20 if quick else 200
    if model_dir is None:
        size = TINY if quick else ML1M
        model_dir = os.path.join(tmp.name, "model")
        make_bench_artifact(model_dir, **size)
        seq_dir = os.path.join(tmp.name, "seq")
        make_bench_artifact(seq_dir, **size, seq_history=seq_len)
        note = (f"untrained NeuMF {size['n_users']} users x {size['n_items']} items, factors {size['factors']}, "
                f"layers {list(size['layers'])}: serving speed does not depend on the weights")
    art = load_artifact(model_dir)
    user_ids = [str(u) for u in art.user_ids[: min(art.n_users, 8192)]]

    from ncf_ray import console

    owns_ray = start_ray(ha_proxy)
    if owns_ray:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        console.reroute()  # Serve's driver-side logger gets its console handler at start (as in run_server)
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    host, port = "127.0.0.1", int(http.port)
    if quick:
        replicas = 1  # tiny sizes measure nothing a second replica would change; each one is a process to start
    cfg = ServeConfig(model_dir=model_dir, replicas=replicas)
    try:
        serve.run(bind_app(cfg), name=BENCH_APP, route_prefix="/bench")
        serve.run(_noop_app(), name=NOOP_APP, route_prefix="/noop")
        one = [json.dumps({"user_id": u, "k": 10}) for u in user_ids]
        many, few = _batch_bodies(user_ids, batch_users), _batch_bodies(user_ids, small_batch_users)
        _wait_http(host, port, "/bench/recommend", one[0])
        _wait_http(host, port, "/noop", one[0])
        floor = run_load(host, port, "/noop", one, connections, seconds)
        scoring = _scoring(host, port)
        rec = run_load(host, port, "/bench/recommend", one, connections, seconds)
        batch = run_load(host, port, "/bench/recommend/batch", many, connections, seconds)
        batch_small = run_load(host, port, "/bench/recommend/batch", few, connections, seconds)
        # Baseline: the same deployment switched to exact fp32 scoring (an in-place reconfigure).
        serve.run(bind_app(dataclasses.replace(cfg, precision="fp32")), name=BENCH_APP, route_prefix="/bench")
        _wait_precision(host, port, "fp32")
        rec_fp32 = run_load(host, port, "/bench/recommend", one, connections, seconds)
        batch_fp32 = run_load(host, port, "/bench/recommend/batch", many, connections, seconds)
        seq = None
        if seq_dir is not None:  # the sequence model, swapped into the same deployment, without and with history
            serve.run(bind_app(dataclasses.replace(cfg, model_dir=seq_dir)), name=BENCH_APP, route_prefix="/bench")
            _wait_model(host, port, "seq")
            rng = random.Random(0)
            recent = [json.dumps({"user_id": u, "k": 10, "recent_items": [str(rng.randint(1, art.n_items))
                                                                           for _ in range(5)]}) for u in user_ids]
            seq = {"recommend": run_load(host, port, "/bench/recommend", one, connections, seconds),
                   "recommend_recent": run_load(host, port, "/bench/recommend", recent, connections, seconds),
                   "history_len": seq_len}
    finally:
        if owns_ray:
            ray.shutdown()  # takes Serve with it, without waiting out each replica's drain window
        else:
            for app in (BENCH_APP, NOOP_APP):
                try:
                    serve.delete(app)
                except Exception:  # noqa: BLE001 - best-effort cleanup; the caller's Serve keeps running
                    pass
        tmp.cleanup()
    for b, bodies in ((batch, many), (batch_fp32, many), (batch_small, few)):
        b["users_per_request"] = len(json.loads(bodies[0])["user_ids"])
        b["users_per_s"] = b["rps"] * b["users_per_request"]
    return {
        "recommend": rec,
        "recommend_batch": batch,
        "recommend_batch_small": batch_small,
        "noop_floor": floor,
        "ratio_to_floor": rec["rps"] / floor["rps"] if floor["rps"] else None,
        "fp32_baseline": {"recommend": rec_fp32, "recommend_batch": batch_fp32},
        "seq": seq,
        "scoring": scoring,
        "settings": {"ingress": "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "default proxy",
                     "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1",
                     "replicas": replicas, "max_batch_size": cfg.max_batch_size,
                     "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                     "max_ongoing_requests": cfg.max_ongoing_requests, "torch_threads_per_replica": 1,
                     "connections": connections, "seconds": seconds, "k": 10, "cpus": os.cpu_count(),
                     "model": {"n_users": art.n_users, "n_items": art.n_items, **dataclasses.asdict(art.model_cfg)}},
        "note": note,
    }


def measure(quick: bool) -> dict[str, Any]:
    """`ncf-ray bench serve`: `bench_serve` on a generated artifact, as table rows (goals for the full size)."""
    res = bench_serve(None, quick)
    rec, batch, floor = res["recommend"], res["recommend_batch"], res["noop_floor"]
    small, base = res["recommend_batch_small"], res["fp32_baseline"]
    precision = res["scoring"]["precision"]
    full = not quick  # the goals are for the ML-1M-size model; --quick serves a tiny one
    table = [
        row("POST /recommend (top-10) requests/s", rec["rps"], "req/s", "no-op endpoint, same Serve", floor["rps"],
            goal=">= 1000" if full else None),
        row(f"POST /recommend/batch users/s ({batch['users_per_request']} users per request)", batch["users_per_s"],
            "users/s", "single /recommend users/s", rec["rps"], goal=">= 20000" if full else None),
        row(f"POST /recommend/batch users/s ({small['users_per_request']} users per request)", small["users_per_s"],
            "users/s", f"{batch['users_per_request']} users per request", batch["users_per_s"]),
        row(f"POST /recommend/batch users/s, {precision} scoring", batch["users_per_s"], "users/s",
            "same deployment, exact fp32 scoring", base["recommend_batch"]["users_per_s"]),
        row(f"POST /recommend requests/s, {precision} scoring", rec["rps"], "req/s",
            "same deployment, exact fp32 scoring", base["recommend"]["rps"]),
    ]
    for key in ("p50_ms", "p99_ms"):
        table.append(row(f"POST /recommend {key.replace('_ms', '')} latency", rec[key], "ms", "no-op endpoint",
                        floor[key], goal="<= 50" if full and key == "p99_ms" else None))
    seq = res.get("seq")
    if seq:
        length = seq["history_len"]
        for key, what in (("recommend", "stored history"), ("recommend_recent", "+ 5 recent_items")):
            r = seq[key]
            table += [row(f"POST /recommend requests/s, seq L {length} ({what})", r["rps"], "req/s",
                          "NeuMF, same deployment", rec["rps"], goal=">= 1000" if full else None),
                      row(f"POST /recommend p99 latency, seq L {length} ({what})", r["p99_ms"], "ms",
                          "NeuMF", rec["p99_ms"], goal="<= 50" if full else None)]
            if r.get("errors"):
                table.append(row(f"errors, seq ({what})", float(r["errors"]), "count"))
    return {"rows": table, **res}


def main(argv: list[str] | None = None) -> None:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--load"]:
        return load_main()
    p = argparse.ArgumentParser(prog="python -m ncf_ray.bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--batch-users", type=int, default=1000, help="users per /recommend/batch request (max 1000)")
    p.add_argument("--small-batch-users", type=int, default=256)
    p.add_argument("--no-ha-proxy", dest="ha_proxy", action="store_false")
    a = p.parse_args(argv)
    out = bench_serve(a.model_dir, a.quick, replicas=a.replicas, connections=a.connections,
                      batch_users=a.batch_users, small_batch_users=a.small_batch_users, ha_proxy=a.ha_proxy)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
