"""Ray Serve endpoint for a model artifact: top-K recommendations over HTTP, batched, hot-swappable.

    ncf-ray serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--replicas N|auto] [--ha-proxy]
    serve run ncf_ray.serve:build_app model_dir=RUN_DIR/model          # the same app through the Serve CLI
    ncf-ray serve MODEL_DIR --emit-config > serve.yaml && serve deploy serve.yaml

One deployment (`NCFServer`) holds a `Recommender` and is also the FastAPI ingress, so a request goes proxy ->
replica -> model with no second hop. Concurrent `POST /recommend` calls are grouped by `@serve.batch` into one
pass over all items; `max_ongoing_requests` (default 128) is well above `max_batch_size` so batches can fill.
That pass is the `AllItemsScorer` of ncf_ray/scoring.py: with `precision="auto"` (the default) a compiled bf16
kernel picks a shortlist that is re-ranked in fp32 wherever the CPU/GPU has bf16 units, else exact fp32. The
artifact path (and precision) travel in `user_config`, so changing them calls `reconfigure`, which loads and
verifies the new artifact off the event loop and only then swaps the reference: batches already running keep
the old model.

Ingress: with `RAY_SERVE_ENABLE_HA_PROXY=1` in the environment that starts Ray, Serve puts HAProxy in front and
the replica's own HTTP server answers directly (several times the default Python proxy's throughput; see
ncf_ray/bench/serve.py). `run_server` sets it by default. Binds 127.0.0.1 unless told otherwise; HAProxy's stats
and metrics ports (8404, 9101) bind the same address (loopback when the API binds every interface), see
`install_haproxy_wrapper`. Nothing runs at import.
"""

# No `from __future__ import annotations`: FastAPI must see the real request model classes in the route
# signatures that @serve.ingress rebinds.
import asyncio
import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from ray import serve

from ncf_ray.config import ServeConfig, build_serve_config
from ncf_ray.errors import UserError
from ncf_ray.inputs import describe as describe_inputs
from ncf_ray.recommender import Recommender
from ncf_ray.scoring import reuse_large_allocations

APP_NAME = "ncf"
MAX_BODY_BYTES = 1 << 20
MAX_IDS = 1000
MAX_K = 1000
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
# Beside HAProxy, Serve's throughput mode (Ray >= 2.56): user code runs on the replica's own event loop (no hop
# to a separate user-code thread), request-path logs are buffered (1,000 lines) and not copied to stderr,
# replica-to-replica calls use gRPC, and the GC freezes what the replica allocated at start. Our handlers never
# block that loop for long: /recommend runs one batch's scoring (milliseconds), model loads run in a thread,
# /recommend/batch in its own executor. It opens no other port (checked with `ss -ltnp`). An operator's own
# value in the environment wins (`RAY_SERVE_THROUGHPUT_OPTIMIZED=0 ncf-ray serve ...`).
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"

# A raw id is an int or a string as the client knows it (never a float, bool or null).
RawId = StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=256)]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K)]
ContextBody = Annotated[dict[str, StrictInt | Annotated[StrictStr, Field(max_length=256)]] | None,
                        Field(max_length=32)]
Objective = Literal["click", "purchase"]


# ------------------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo such as "top_k" must not be silently ignored


class RecommendRequest(_Body):
    # None: an anonymous shopper, served from recent_items alone.
    user_id: RawId | None = None
    k: K = 10
    exclude_seen: StrictBool = True
    candidates: list[RawId] | None = Field(None, max_length=MAX_IDS)
    # What the user just did, oldest first (at most the model's history length; unknown ids are skipped).
    recent_items: list[RawId] | None = Field(None, max_length=MAX_IDS)
    # The request's context for models trained with it (hour, dow, device, ...: ncf_ray/context.py).
    context: ContextBody = None
    # Which head a multi-task model ranks by: likely to click, or likely to buy.
    objective: Objective = "click"
    # Per item, up to 3 of the user's own past items that support it ("because"; ncf_ray/explain.py).
    explain: StrictBool = False

    @model_validator(mode="after")
    def _someone(self) -> "RecommendRequest":
        if self.user_id is None and self.recent_items is None:
            raise ValueError("give user_id, recent_items or both")
        return self


class BatchRequest(_Body):
    user_ids: list[RawId | None] = Field(min_length=1, max_length=MAX_IDS)
    k: K = 10
    exclude_seen: StrictBool = True
    # One list per user (same order as user_ids), or null for a user without one.
    recent_items: list[list[RawId] | None] | None = Field(None, max_length=MAX_IDS)
    context: ContextBody = None  # one context for every user of the batch
    objective: Objective = "click"
    explain: StrictBool = False

    @model_validator(mode="after")
    def _aligned(self) -> "BatchRequest":
        if self.recent_items is not None and len(self.recent_items) != len(self.user_ids):
            raise ValueError(f"recent_items has {len(self.recent_items)} lists for {len(self.user_ids)} user_ids")
        return self


class ScoreRequest(_Body):
    user_id: RawId
    item_ids: list[RawId] = Field(min_length=1, max_length=MAX_IDS)
    context: ContextBody = None
    objective: Objective = "click"


class Because(BaseModel):
    item_id: str  # one of the user's own past items
    score: float  # its support for the recommended item (> 0; higher is stronger)


class Item(BaseModel):
    item_id: str
    score: float
    because: list[Because] | None = None  # only with explain: true


class Recommendation(BaseModel):
    user_id: int | str | None
    items: list[Item]
    cold_start: bool
    model_version: str
    unknown_items: list[str] | None = None  # only with candidates: the ids the model does not know
    # Only with recent_items: which history the list used (stored, stored+request, request, none) and how many
    # recent ids the model does not know.
    history: str | None = None
    unknown_recent_items: int | None = None


# ------------------------------------------------------------------------------------------------ HTTP plumbing
def _error(status: int, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `max_bytes`, judged by Content-Length and by the bytes actually
    received (a chunked or mislabelled upload is cut off at the limit, never buffered whole)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body over {self.max_bytes} bytes")
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                return await _error(400, f"bad Content-Length {declared[:32]!r}")(scope, receive, send)
            if int(declared) > self.max_bytes:
                return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


api = FastAPI(
    title="ncf_ray recommendations",
    description="Top-K items per user from a Neural Collaborative Filtering model (raw ids in and out).",
)
api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "malformed JSON body", errors)
    return _error(422, "invalid request", errors)


@api.exception_handler(UserError)
async def _user_error(request: Request, exc: UserError) -> JSONResponse:
    return _error(400, str(exc))


# ------------------------------------------------------------------------------------------------ deployment
def _load_recommender(model_dir: str, precision: str) -> Recommender:
    """Load + verify an artifact, build its scorer (compiling the bf16 kernel when used) and warm it up so the
    first request is fast: for a history model that includes the known users' cached states (see
    `Recommender.warm_users`; ~6 s for ML-1M's 6,040 users at L 200 on one core, while the old model serves)."""
    rec = Recommender.from_path(model_dir, precision=precision)
    rec.warm_users()
    if rec.n_users:
        rec.recommend([str(rec.artifact.user_ids[0])], 1)
    return rec


def _is_path(text: str) -> bool:
    """An absolute local path (POSIX or Windows) or a URI: what a server must not reveal about its disks."""
    return text.startswith(("/", "~", "\\\\")) or "://" in text or (len(text) > 2 and text[1:3] in (":\\", ":/"))


def public_paths(obj: Any) -> Any:
    """`obj` with every string that is an absolute path or URI cut to its last component (recursively through
    dicts and lists), for bodies that echo the artifact's metadata: its dataset `source` and training config may
    name files on the machine that trained it."""
    if isinstance(obj, dict):
        return {k: public_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_paths(v) for v in obj]
    if isinstance(obj, str) and _is_path(obj):
        return obj.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return obj


def _json(obj: Any) -> Response:
    """A JSON response encoded with orjson (the hot endpoints' bodies are up to ~0.5 MB of ids and floats)."""
    return Response(orjson.dumps(obj), media_type="application/json")


def _batch_body(rec: Recommender, req: BatchRequest) -> bytes:
    """Score and encode a /recommend/batch answer in one go: on the bulk thread, so the event loops that
    carry HTTP do not hold the GIL encoding large bodies while the scorer waits for it."""
    results = rec.recommend(req.user_ids, req.k, req.exclude_seen, recent_items=req.recent_items,
                            context=[req.context] * len(req.user_ids), objective=req.objective,
                            explain=req.explain)
    return orjson.dumps([_answer(u, r, rec, req.k) for u, r in zip(req.user_ids, results)])


def _answer(user_id: Any, res: dict[str, Any], rec: Recommender, k: int, history: bool = True) -> dict[str, Any]:
    """The response for one user: the raw id as the client sent it, at most k items, the model version (and
    the history fields when this user's request carried recent_items)."""
    answer = {"user_id": user_id, "items": res["items"][:k], "cold_start": res["cold_start"],
              "model_version": rec.model_version}
    for key in ("unknown_items", *(("history", "unknown_recent_items") if history else ())):
        if key in res:
            answer[key] = res[key]
    return answer


@serve.deployment(name="NCFServer")
@serve.ingress(api)
class NCFServer:
    """Holds one Recommender; `reconfigure` swaps it. Model compute runs on the replica's event loop with one
    torch thread: a replica is one CPU, and more replicas (not more threads) use more cores."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        reuse_large_allocations()  # scoring's multi-MiB temporaries stay in the heap (see ncf_ray/scoring.py)
        self._rec: Recommender | None = None
        self._loaded: tuple[str, str] = ("", "")  # (model_dir, precision) of self._rec
        self._user_config: dict[str, Any] = {}  # the last one applied: what promote/rollback keep when swapping
        # Bulk requests run one at a time beside the event loop: on a one-CPU replica, concurrent big forwards
        # only thrash caches, and the loop stays free to batch /recommend meanwhile.
        self._bulk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ncf-bulk")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        model_dir = str(user_config.get("model_dir") or "")
        if not model_dir:
            raise UserError("user_config needs model_dir")
        if "max_batch_size" in user_config:
            self._recommend_batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._recommend_batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        precision = str(user_config.get("precision") or "auto")
        if self._rec is not None and (model_dir, precision) == self._loaded:
            return
        # Load and verify in a thread (requests keep flowing on the old model), then swap one reference.
        rec = await asyncio.to_thread(_load_recommender, model_dir, precision)
        self._rec, self._loaded = rec, (model_dir, precision)
        self._user_config = dict(user_config)

    async def serving(self) -> dict[str, Any]:
        """What this replica serves, for `promote` / `rollback` over a deployment handle (never over HTTP: it
        holds the artifact's full path): the applied user_config and the model version."""
        rec = self._current()
        return {"user_config": dict(self._user_config), "model_dir": self._loaded[0],
                "model_version": rec.model_version}

    def _current(self) -> Recommender:
        if self._rec is None:
            raise RuntimeError("no model loaded yet")
        return self._rec

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _recommend_batched(self, reqs: list[RecommendRequest]) -> list[dict[str, Any]]:
        """One forward pass per batch (per exclude_seen, objective and explain value: explanations cost only the
        requests that ask) at the batch's largest k; each answer is cut to its own k (top-k lists are prefixes of the
        top-kmax list)."""
        rec = self._current()  # the whole batch uses one model, even if a swap lands meanwhile
        out: list[dict[str, Any]] = [{} for _ in reqs]
        groups = sorted({(r.exclude_seen, r.objective, r.explain) for r in reqs})
        for exclude, objective, explain in groups:
            pos = [i for i, r in enumerate(reqs)
                   if r.exclude_seen is exclude and r.objective == objective and r.explain is explain]
            kmax = max(reqs[i].k for i in pos)
            recent = [reqs[i].recent_items for i in pos]
            results = rec.recommend([reqs[i].user_id for i in pos], kmax, exclude_seen=exclude,
                                    recent_items=recent if any(r is not None for r in recent) else None,
                                    context=[reqs[i].context for i in pos], objective=objective,
                                    explain=explain)
            for i, res in zip(pos, results):
                out[i] = _answer(reqs[i].user_id, res, rec, reqs[i].k, reqs[i].recent_items is not None)
        return out

    @api.post("/recommend", response_model=Recommendation)
    async def recommend(self, req: RecommendRequest) -> Response:
        """Top-k items for one user (or an anonymous shopper with recent_items); without any history the most
        popular items come back with cold_start true."""
        rec = self._current()
        # A bad request fails alone, never the batch it would join.
        rec.check_recent_items(req.recent_items)
        rec.context_ids(req.context)
        rec.check_objective(req.objective)
        if req.candidates is not None:  # a per-request candidate set cannot share a batch's item axis
            recent = None if req.recent_items is None else [req.recent_items]
            res = rec.recommend([req.user_id], req.k, req.exclude_seen, req.candidates, recent_items=recent,
                                context=[req.context], objective=req.objective, explain=req.explain)[0]
            return _json(_answer(req.user_id, res, rec, req.k))
        return _json(await self._recommend_batched(req))

    @api.post("/recommend/batch", response_model=list[Recommendation])
    async def recommend_batch(self, req: BatchRequest) -> Response:
        """Top-k for up to 1000 users in one forward pass."""
        for recent in req.recent_items or ():
            self._current().check_recent_items(recent)
        self._current().context_ids(req.context)
        self._current().check_objective(req.objective)
        body = await asyncio.get_running_loop().run_in_executor(self._bulk, _batch_body, self._current(), req)
        return Response(body, media_type="application/json")

    @api.post("/score")
    async def score(self, req: ScoreRequest) -> Response:
        """Model scores of the given items for one user; unknown items come back with score null, known false."""
        rec = self._current()
        res = rec.score(req.user_id, req.item_ids, context=req.context, objective=req.objective)
        res.update(user_id=req.user_id, model_version=rec.model_version)
        return _json(res)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        rec = self._current()
        return {"status": "ok", "model_version": rec.model_version}

    @api.get("/model")
    async def model(self) -> dict[str, Any]:
        """The served model: version, architecture, vocabulary sizes, dataset meta and training metrics."""
        rec = self._current()
        art = rec.artifact
        return public_paths({
            "model_version": art.model_version,
            "model_dir": Path(self._loaded[0]).name,  # the artifact's name, never where it lies on the server
            "scoring": {"precision": rec.scorer.precision, "note": rec.scorer.note},
            "created": art.created,
            "model": dataclasses.asdict(art.model_cfg),
            # What the model reads beside ids, and the objectives /recommend takes.
            "inputs": describe_inputs(art.inputs, art.model_cfg),
            "n_users": art.n_users,
            "n_items": art.n_items,
            "dataset_meta": art.dataset_meta,
            "metrics": art.metrics,
        })


# ------------------------------------------------------------------------------------------------ builders
def serve_config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from `serve run ... key=value` strings (or a YAML `args` mapping); unknown keys refused.
    The one builder is config.build_serve_config (the CLI's flags go through it too)."""
    return build_serve_config(**args)


def _check(cfg: ServeConfig) -> None:
    """What a ServeConfig built in code may still lack (its fields validate themselves): a model dir."""
    if not cfg.model_dir:
        raise UserError("model_dir is required (the model artifact dir, e.g. RUN_DIR/model)")


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options: one CPU per replica; 'auto' scales on ongoing requests up to the CPU count."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 1},
        "user_config": {
            "model_dir": os.path.abspath(cfg.model_dir),
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "precision": cfg.precision,
            # The whole config, so promote/rollback redeploy with the same settings and only a new model_dir.
            "serve_config": {**dataclasses.asdict(cfg), "model_dir": os.path.abspath(cfg.model_dir)},
        },
        "graceful_shutdown_timeout_s": 10,
    }
    if cfg.replicas == "auto":
        opts["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": max(1, os.cpu_count() or 1),
            # A replica is "busy" once about half a batch is waiting on it.
            "target_ongoing_requests": max(2, cfg.max_batch_size // 2),
        }
    else:
        opts["num_replicas"] = int(cfg.replicas)
    return opts


def _code_version() -> str:
    """A hash of the code a replica runs. `serve deploy` versions deployments by code already; imperative
    `serve.run` picks a random version each call, which would replace replicas on every model change. With a code
    version, a redeploy that changes only user_config (the model dir) is an in-place `reconfigure`."""
    h = hashlib.sha256()
    for mod in ("serve", "recommender", "scoring", "model", "artifact"):
        h.update(Path(__file__).with_name(f"{mod}.py").read_bytes())
    return h.hexdigest()[:16]


def bind_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for a checked ServeConfig."""
    _check(cfg)
    deployment = NCFServer.options(**deployment_options(cfg))
    deployment._version = _code_version()  # no public setter since `version=` was removed from the options
    return deployment.bind()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application (`serve run ncf_ray.serve:build_app model_dir=...`)."""
    return bind_app(serve_config_from_args(args))


def emit_config(cfg: ServeConfig) -> str:
    """A Serve config YAML for `serve deploy` (import path + args, HTTP host/port)."""
    import yaml

    _check(cfg)
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("host", "port")}
    args["model_dir"] = os.path.abspath(cfg.model_dir)
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": "ncf_ray.serve:build_app", "args": args},
        ],
    }
    header = (
        "# Serve config for ncf_ray (written by `ncf-ray serve --emit-config`).\n"
        f"# For HAProxy ingress start the cluster with {HA_PROXY_ENV}=1 {THROUGHPUT_ENV}=1 ray start --head,\n"
        "# then: serve deploy FILE\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------------------------ HAProxy admin ports
# Ray 2.60's HAProxy template binds its stats page (`listen stats`, `bind *:8404`) and Prometheus exporter
# (`frontend prometheus`, `bind :9101`) on every interface, and no setting changes the interface (the ports are
# RAY_SERVE_HAPROXY_STATS_PORT / RAY_SERVE_HAPROXY_METRICS_PORT). Serve does let us name the HAProxy binary
# (RAY_SERVE_HAPROXY_BINARY_PATH): a local Ray started here gets a wrapper that copies each config Serve hands to
# HAProxy with those two binds narrowed to one address, then execs the real binary. A cluster joined through
# RAY_ADDRESS keeps what its operator set up.
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
HAPROXY_ADMIN_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
_WRAPPER = """#!{python}
# Written by ncf_ray.serve: HAProxy with its stats/metrics binds narrowed to {host} (see serve.py).
import os, re, sys
args = sys.argv[1:]
if "-f" in args[:-1]:
    i = args.index("-f") + 1
    with open(args[i]) as f:
        text = f.read()
    text = re.sub(r"^(\\s*bind\\s+)\\*?:({ports})\\b", r"\\g<1>{host}:\\g<2>", text, flags=re.M)
    narrowed = args[i] + ".local"
    with open(narrowed + ".tmp", "w") as f:
        f.write(text)
    os.replace(narrowed + ".tmp", narrowed)
    args[i] = narrowed
if os.path.realpath({real!r}) == os.path.realpath(__file__):
    sys.exit("ncf_ray haproxy wrapper: the real binary is this wrapper itself")
os.execv({real!r}, [{real!r}, *args])
"""


def admin_host(serve_host: str) -> str:
    """Where HAProxy's stats and metrics ports bind: the serve host when it is one address, else loopback (the
    stats page has no authentication; binding the API to every interface need not publish it too)."""
    return "127.0.0.1" if serve_host in ("", "0.0.0.0", "::", "*") else serve_host


def haproxy_wrapper(real_binary: str, host: str, ports: list[int]) -> str:
    """The source of the wrapper script (see the comment above)."""
    import sys

    return _WRAPPER.format(python=sys.executable, host=host, ports="|".join(str(p) for p in ports), real=real_binary)


def install_haproxy_wrapper(serve_host: str, directory: str | None = None) -> str | None:
    """Write the wrapper (executable) and point RAY_SERVE_HAPROXY_BINARY_PATH at it; returns its path, or None
    when the variable is already set (an operator's choice) or no HAProxy binary is found."""
    import stat
    import tempfile

    if os.environ.get(HAPROXY_BINARY_ENV):
        return None
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        real = get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None
    ports = [int(os.environ.get(k, v)) for k, v in HAPROXY_ADMIN_PORTS.items()]
    if directory is None:
        import atexit
        import shutil

        directory = tempfile.mkdtemp(prefix="ncfray-haproxy-")
        atexit.register(shutil.rmtree, directory, True)
    path = Path(directory) / "haproxy"
    path.write_text(haproxy_wrapper(real, admin_host(serve_host), ports))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.environ[HAPROXY_BINARY_ENV] = str(path)
    return str(path)


def start_ray(ha_proxy: bool, host: str = "127.0.0.1") -> bool:
    """Start or join Ray with the ingress choice in the environment every Serve process inherits (Serve reads
    RAY_SERVE_ENABLE_HA_PROXY at import in each of its actors; a cluster joined via RAY_ADDRESS keeps its own).
    With HAProxy, its stats/metrics ports bind `admin_host(host)` (install_haproxy_wrapper), and Serve's
    throughput mode is on unless the environment says otherwise (THROUGHPUT_ENV).
    Returns True when this call started a local Ray that the caller should shut down."""
    import ray

    from ncf_ray import console
    from ncf_ray.runtime import ensure_ray

    console.reroute()  # `from ray import serve` gave Serve's logger a console handler after the session began
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        os.environ[HA_PROXY_ENV] = "1" if ha_proxy else "0"
        if ha_proxy:
            os.environ.setdefault(THROUGHPUT_ENV, "1")
            install_haproxy_wrapper(host)
    return ensure_ray(log_to_driver=False)


def run_server(cfg: ServeConfig, blocking: bool = True, ha_proxy: bool = True) -> str:
    """Start Serve on cfg.host:cfg.port with the app and return its URL; blocks until Ctrl-C when blocking."""
    import ray

    _check(cfg)
    from ncf_ray import console

    owns_ray = start_ray(ha_proxy, cfg.host)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    console.reroute()  # Serve's driver-side logger gets its console handler at start
    serve.run(bind_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    if blocking:
        print(f"serving {cfg.model_dir} at {url}  (OpenAPI: {url}/docs; Ctrl-C stops)", flush=True)
        # promote / rollback join this Ray: a local one lives in a private temp dir, so `auto` cannot find it.
        print(f"swap models: ncf-ray promote NEW_MODEL_DIR --serve-address "
              f"{ray.get_runtime_context().gcs_address}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C is how a foreground server is meant to stop
            print("stopping", flush=True)
            if owns_ray:
                ray.shutdown()  # at once: serve.shutdown() would wait out each replica's 30 s drain window
            else:
                serve.delete(APP_NAME)
    return url


# ------------------------------------------------------------------------------------------------ promote / rollback
# `ncf-ray promote NEW_MODEL_DIR` and `ncf-ray rollback` change the model of the running app the way `ncf-ray serve`
# deploys it: serve.run of the same app with the same settings (read back from a replica) and another model_dir
# in user_config, so replicas `reconfigure` in place and no request is dropped (tests/integration/test_serve.py).
DEFAULT_TOLERANCE = 0.01
SWAP_TIMEOUT_S = 120.0


def _connect(address: str | None) -> Any:
    """The handle of the running app, joining the Ray cluster at `address` unless this process is in one."""
    import logging

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False,
                     logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--serve-address {address or 'auto'}: cannot join the Ray cluster serving the "
                            f"model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        return serve.get_app_handle(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - Serve raises several types for "no such app / not started"
        raise UserError(f"no {APP_NAME!r} Serve app is running on the Ray cluster at {address or 'auto'}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def served(address: str | None = None) -> dict[str, Any]:
    """What the running app serves now (`NCFServer.serving` of one replica)."""
    return _connect(address).serving.remote().result(timeout_s=60)


def swap_model(model_dir: str, address: str | None = None, timeout_s: float = SWAP_TIMEOUT_S) -> dict[str, Any]:
    """Redeploy the running app with `model_dir` (verified here first) and wait until a replica serves it.
    Returns {"previous": served-before, "model_version": the new one}."""
    from ncf_ray.artifact import load_artifact

    model_dir = os.path.abspath(model_dir)
    art = load_artifact(model_dir)  # a bad artifact is refused before the deployment is touched
    before = served(address)
    fields = dict(before["user_config"].get("serve_config") or {})
    if not fields:  # deployed before serve_config was recorded: its user_config holds the rest
        fields = {k: before["user_config"][k] for k in ("max_batch_size", "batch_wait_timeout_s", "precision")
                  if k in before["user_config"]}
    cfg = build_serve_config(**{**fields, "model_dir": model_dir})
    serve.run(bind_app(cfg), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + timeout_s
    while served(address)["model_dir"] != model_dir:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app did not serve {model_dir} within {timeout_s:g} s of the redeploy")
        time.sleep(0.2)
    return {"previous": {k: before[k] for k in ("model_dir", "model_version")}, "model_version": art.model_version,
            "model_dir": model_dir}


def promote(model_dir: str, address: str | None = None, tolerance: float = DEFAULT_TOLERANCE,
            force: bool = False) -> dict[str, Any]:
    """Swap `model_dir` into the running app if its update guard holds (update.guard: child holdout HR@K >=
    parent's - tolerance), or with `force`; otherwise a UserError and the served model stays."""
    from ncf_ray.artifact import load_artifact
    from ncf_ray.update import guard

    ok, why = guard(load_artifact(model_dir).metrics, tolerance)
    if not ok and not force:
        raise UserError(f"not promoted: {why}; the served model stays (--force promotes anyway)")
    return {**swap_model(model_dir, address), "guard": why, "guard_ok": ok, "forced": force and not ok}


def rollback(address: str | None = None) -> dict[str, Any]:
    """Swap the served model's parent (its manifest lineage) back in."""
    from ncf_ray.artifact import load_artifact

    now = served(address)
    lineage = load_artifact(now["model_dir"]).lineage or {}
    parent = lineage.get("parent_dir")
    if not parent:
        raise UserError(f"the served model {now['model_version']} has no parent in its lineage (it was trained, "
                        f"not updated): nothing to roll back to")
    if not Path(parent).is_dir():
        raise UserError(f"the served model's parent {parent} is gone; promote an artifact explicitly")
    return swap_model(parent, address)
