"""Fast all-items scoring for serving: a bf16 shortlist over every item, re-ranked exactly in fp32.

Serving ranks all items for every request. Through the model-input contract the catalogue's item
representations are computed once and each request computes only its users' representations; what is left
for a NeuMF-style tower head (`model.tower_parts`) is still a matmul over every (user, item) pair per hidden
layer plus elementwise passes over tensors of that size. Where bf16 dot-product units exist (AVX512-BF16 or AMX
CPUs, GPUs) the tower runs as one `torch.compile`d kernel instead: add + ReLU + cast and bias + ReLU + final dot
are fused into one pass each, the hidden matmuls run in bf16 with fp32 accumulation, and the graph runs as one
C++ call that releases the GIL (figures: bench/RESULTS.md, `ncf-ray bench serve`).

bf16 moves logits enough to swap near-ties, so its scores only pick a shortlist: each chunk of users keeps its
top k + margin items (`shortlist_size`) while the chunk is still in cache; the shortlist is then re-scored by the
model's own fp32 forward and re-sorted. Returned scores are therefore the model's fp32 logits (what `/score`
gives, to ~1e-6), and the list is the exact top-k unless an exact top-k item ranks below k + margin by the bf16
score; `tests/unit/test_scoring.py` checks exactness on a model trained in the test.

Dot-product heads (GMF, MF, seq with head=dot) and MLPs without a tower layer are one matmul already: they always
use the exact fp32 path.

User representations are computed once per known user and reused. A model without history has one per user: the
whole table is built at load. A model that reads history (seq) has one per (user, history); a known user's stored
history changes only with a new artifact (the continual `update` writes one, and a model swap builds a new
Recommender and so a new scorer), so the state from the stored history is cached per user: filled lazily, a
chunk of the missing users at a time, or all at load with `warm_users()`. Requests whose history differs from
the stored one (recent_items, anonymous users) still run the attention; callers say which rows those are (the
`stored` mask). The bf16 shortlist is re-ranked from the same representations through the model's head.

If compilation fails (no C++ compiler on a CPU host, for instance) the scorer notes why and falls back to fp32.
Ray-free: used by `Recommender` (ncf_ray/recommender.py) inside each Serve replica.
"""

from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ncf_ray.batch import Histories
from ncf_ray.errors import UserError
from ncf_ray.model import TowerParts, chunk_users, user_batch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")

# Users per kernel call on CPU: the [chunk, h1, M] hidden tensor stays near 2^21 elements (4 MiB in bf16), small
# enough to stay in cache between the fused passes. GPUs use model.GPU_SCORE_CHUNK_ELEMENTS.
FAST_CHUNK_ELEMENTS = 1 << 21
# Users per user_repr call when filling the cache of a history model's states: [chunk, L, D] activations of a
# few MiB at ML-1M sizes (L 200, D 64), and a lazy fill never stalls one request for long.
STATE_CHUNK_USERS = 256


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls have hardware support here (AVX512-BF16/AMX through oneDNN, or a bf16 GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def shortlist_size(k: int, n_items: int) -> int:
    """How many bf16-ranked items are re-scored in fp32 for a top-k list: k plus a margin of max(k, 10). (On the
    trained default model every exact top-10 item was within the bf16 top 20; topk's cost grows with its k.)"""
    return min(n_items, k + max(k, 10))


def reuse_large_allocations() -> bool:
    """Keep freed multi-MiB buffers in the process heap (glibc) instead of unmapping them.

    PyTorch's CPU allocator hands big temporaries straight to malloc/free. glibc serves them with mmap, or trims
    them off the heap when freed, so every scoring call would page-fault fresh memory for its [chunk, M, h]
    buffers (the effect on users/s is in bench/RESULTS.md). Raises the mmap threshold to glibc's 32 MiB cap and
    the trim threshold to 256 MiB. Process-wide; called in each Serve replica. False where not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


def _tower_scores(
    u_half: Tensor,
    item_half_t: Tensor,
    hidden_w: list[Tensor],
    hidden_b: list[Tensor],
    w_out: Tensor,
    bias: Tensor,
    u_dot: Tensor | None,
    item_dot: Tensor | None,
) -> Tensor:
    """Logits [C, M] of C users against all M items: the tower from its split first layer, matmuls in the
    dtype of hidden_w, everything else in fp32; plus the GMF branch's dot product when given.

    Item-major layout: activations are [C, width, M], so every step runs along the long item axis — each hidden
    layer is a [h_out, h_in] @ [h_in, M] matmul and the final dot is a sum over `width` rows of M-long vectors
    (a [C * M, width] layout needs one horizontal vector reduction per pair, which was slower)."""
    h = torch.relu(u_half[:, :, None] + item_half_t[None, :, :])
    for w, b in zip(hidden_w, hidden_b):
        h = torch.relu((w @ h.to(w.dtype)).float() + b[:, None])
    out = (h * w_out[:, None]).sum(1) + bias
    if u_dot is not None and item_dot is not None:
        out = out + u_dot @ item_dot
    return out


def _own_copy(fn: Callable) -> Callable:
    """fn with a code object of its own. Dynamo keeps compiled graphs, and its recompile limit (8), per code
    object: with one shared function, every model a process compiles (another tower depth, each hot swap in a
    Serve replica) added entries until the limit failed the compile and the scorer fell back to fp32 (seen in
    the test suite after a handful of models). A copy per scorer also lets its graphs go with it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class AllItemsScorer:
    """Top-k over all items of a frozen eval-mode model, through the model-input contract.

    `top_k(users, k, exclude, history)` gives the k best items per user with their fp32 logits. The model's
    `item_repr(None)` of the whole catalogue is computed once; so is each known user's `user_repr` (a history
    model's from the stored history, cached on first use or by `warm_users`); other histories run per request.
    Exact scorers rank the model's `score_all`; bf16 scorers (models whose head is NeuMF's tower, see
    `model.tower_parts`) run the compiled kernel a chunk of users at a time, keep each chunk's top k + margin
    (while the chunk is still in cache), and re-rank that shortlist with `exact_pairs`.
    `scores(users, history)` gives the raw [B, M] logits (bf16 approximations unless `exact`).
    Thread-safe: kernel calls are serialised chunk by chunk (a replica has one torch thread anyway)."""

    def __init__(self, model: nn.Module, precision: str = "auto", compile: bool = True,
                 histories: Histories | None = None) -> None:
        """compile=False runs the same bf16 kernel eagerly (slower than fp32 on CPU): for tests and debugging.
        `histories`: the known users' stored histories (CSR, on the model's device) for a model that reads them;
        the state of each known user from that history is then cached (see the module docstring)."""
        if precision not in PRECISIONS:
            raise UserError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
        self.model = model.eval()
        self.n_items = int(model.n_items)
        self.history_len = int(getattr(model, "history_len", 0))
        self.device = next(model.parameters()).device
        self.note = ""
        self._lock = threading.Lock()
        self._fill_lock = threading.Lock()
        # Context (hour, device, ...) comes with each request, so a context model's user representations are
        # computed per request (no per-user table, no state cache).
        self.reads_context = bool(getattr(model, "reads_context", False))
        self.tasks = tuple(getattr(model, "tasks", ("click",)))
        self._stored = histories if self.history_len and not self.reads_context else None
        with torch.inference_mode():
            self._catalogue = model.item_repr(None)  # [M, D]
            # Models without history have one representation per known user: computed once, gathered per request.
            # A history model's known users get theirs from the stored history, cached as they are first asked
            # for (`_ready` marks the rows filled); other histories are computed per request.
            self._users = None if self.history_len or self.reads_context else model.user_repr(
                user_batch(torch.arange(int(model.n_users), device=self.device)))
            self._ready: Tensor | None = None
            if self._stored is not None:
                first = torch.zeros(1, dtype=torch.int64, device=self.device)
                width = model.user_repr(user_batch(first, self._stored.last(first, self.history_len))).shape[-1]
                self._users = torch.zeros((int(model.n_users), width), dtype=self._catalogue.dtype,
                                          device=self.device)
                self._ready = torch.zeros(int(model.n_users), dtype=torch.bool, device=self.device)
        parts_of = getattr(model, "tower_parts", None)
        # The bf16 kernel is NeuMF's single tower head; multi-task heads are scored exactly.
        parts = parts_of() if parts_of is not None and len(self.tasks) == 1 else None
        if precision == "fp32" or parts is None:
            self.precision = "fp32"
            if precision == "bf16" and parts is None:
                self.note = f"{type(model).__name__} has no tower layer to speed up: scored in fp32"
            return
        if precision == "auto" and not bf16_is_fast(self.device):
            self.precision, self.note = "fp32", f"no bf16 matmul units on {self.device.type}: scoring in fp32"
            return
        self.precision = "bf16"
        self._build_tables(parts)
        # cpp_wrapper: the compiled graph runs as one C++ call that releases the GIL (the default Python wrapper
        # holds it through each fused kernel, stalling the Serve replica's HTTP threads meanwhile).
        self._kernel = (
            torch.compile(_own_copy(_tower_scores), dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
            if compile
            else _tower_scores
        )
        self._warm_up()

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"

    @torch.no_grad()
    def _build_tables(self, parts: TowerParts) -> None:
        """Everything that does not depend on the request: the catalogue's halves (GMF part transposed, tower
        half W_i q_i + b transposed), hidden weights in bf16, and the prediction weights."""
        f = parts.factors
        self._factors = f
        self._w_gmf = parts.w_gmf.detach().clone()
        self._item_dot: Tensor | None = self._catalogue[:, :f].t().contiguous() if f else None
        self._item_half_t = self._catalogue[:, f:].t().contiguous()  # [h1, M]
        self._hidden_w = [lin.weight.to(torch.bfloat16).contiguous() for lin in parts.hidden]
        self._hidden_b = [lin.bias.detach().clone() for lin in parts.hidden]
        self._w_out = parts.w_tower.detach().clone()
        self._bias = parts.bias.detach().clone()
        self._chunk = chunk_users(self.n_items, self._item_half_t.shape[0], self.device, FAST_CHUNK_ELEMENTS)

    def _warm_up(self) -> None:
        """Compile now, not on the first request: one user (Dynamo specialises size 1) and a full chunk plus a
        remainder (the dynamic-size graph). Compilation failure means fp32 from here on, with the reason noted."""
        n_users = int(self.model.n_users)
        try:
            for size in (1, self._chunk + 2):
                users = torch.arange(size, device=self.device) % n_users
                history = None
                if self.history_len:
                    history = torch.zeros((size, self.history_len), dtype=torch.int64, device=self.device)
                self.scores(users, history)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, never fail the load
            self.precision = "fp32"
            self.note = f"bf16 kernel unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); fp32"
            log.warning("ncf_ray scoring: %s", self.note)

    def user_repr(self, users: Tensor, history: Tensor | None = None, stored: Tensor | None = None,
                  context: Tensor | None = None) -> Tensor:
        """U [B, D] of the users (history [B, L] for models that read it; context [B, K] for models that read
        context, None = unknown).

        `stored` (bool [B]) marks the rows whose history is the user's stored one: their cached state is used
        (computed now if missing) and their history rows are not read. Without `stored`, a history model uses the
        cache for every row when `history` is None (all users known) and runs the model on every row otherwise."""
        users = users.to(self.device)
        if self.reads_context:
            if self.history_len and history is None:
                raise ValueError(f"{type(self.model).__name__} reads each user's last {self.history_len} items")
            return self.model.user_repr(user_batch(users, history, context))
        if not self.history_len:
            return self._users[users]
        cached = self._cached_rows(users, history, stored)
        if cached is None:
            if history is None:
                raise ValueError(f"{type(self.model).__name__} reads each user's last {self.history_len} items")
            return self.model.user_repr(user_batch(users, history))
        if bool(cached.all()):
            return self.cached_states(users)
        out = torch.empty((len(users), self._users.shape[-1]), dtype=self._users.dtype, device=self.device)
        out[cached] = self.cached_states(users[cached])
        fresh = ~cached
        out[fresh] = self.model.user_repr(user_batch(users[fresh], history[fresh]))
        return out

    def _cached_rows(self, users: Tensor, history: Tensor | None, stored: Tensor | None) -> Tensor | None:
        """bool [B] of the rows served from the state cache (None: no row is)."""
        if self._stored is None:
            return None
        if stored is None:
            return None if history is not None else torch.ones(len(users), dtype=torch.bool, device=self.device)
        stored = stored.to(self.device, torch.bool) & (users >= 0)
        if history is None and not bool(stored.all()):
            raise ValueError("rows not marked stored need their history")
        return stored if bool(stored.any()) else None

    @torch.inference_mode()
    def cached_states(self, users: Tensor) -> Tensor:
        """U [B, D] of known users (history models) from their stored histories, each user's computed once.

        Missing users are computed a chunk at a time outside any lock (two threads may both compute a user:
        they write the same values), then written and marked ready under a short lock, so a reader never sees
        a row marked ready before its values are written."""
        if self._stored is None or self._ready is None or self._users is None:
            raise ValueError("cached_states needs a history model built with the users' stored histories")
        users = users.to(self.device)
        if len(users) and (int(users.min()) < 0 or int(users.max()) >= len(self._ready)):
            raise ValueError(f"cached_states takes known users 0..{len(self._ready) - 1}")
        missing = torch.unique(users[~self._ready[users]])
        for start in range(0, len(missing), STATE_CHUNK_USERS):
            chunk = missing[start : start + STATE_CHUNK_USERS]
            reps = self.model.user_repr(user_batch(chunk, self._stored.last(chunk, self.history_len)))
            with self._fill_lock:
                self._users[chunk] = reps
                self._ready[chunk] = True
        return self._users[users]

    @torch.inference_mode()
    def warm_users(self) -> float:
        """Fill the whole state cache now (a history model's known users; a no-op otherwise); returns seconds."""
        start = time.perf_counter()
        if self._ready is not None:
            self.cached_states(torch.arange(len(self._ready), device=self.device))
        return time.perf_counter() - start

    def _kernel_scores(self, reps: Tensor) -> Tensor:
        """One chunk of user representations through the kernel. The lock is held per chunk only: a caller on a
        Serve replica's event loop (batched /recommend) then waits for at most one chunk of a concurrent
        /recommend/batch."""
        f = self._factors
        u_dot = reps[:, :f] * self._w_gmf if f else None
        with self._lock:
            return self._kernel(reps[:, f:].contiguous(), self._item_half_t, self._hidden_w, self._hidden_b,
                                self._w_out, self._bias, u_dot, self._item_dot)

    @torch.inference_mode()
    def scores(self, users: Tensor, history: Tensor | None = None, stored: Tensor | None = None,
               context: Tensor | None = None, task: str | None = None) -> Tensor:
        """[B, M] float32 logits of every user against all items (bf16 approximations unless `exact`), for
        `task` (None: the model's first, click)."""
        return self._scores_of(self.user_repr(users, history, stored, context), task)

    def _is_default(self, task: str | None) -> bool:
        return task is None or task == self.tasks[0]

    def _scores_of(self, reps: Tensor, task: str | None = None) -> Tensor:
        if not self._is_default(task):  # other heads are scored exactly
            return self.model.score_all(reps, self._catalogue, task=task).float()
        if self.exact:
            return self.model.score_all(reps, self._catalogue).float()
        parts = [self._kernel_scores(reps[s : s + self._chunk]) for s in range(0, len(reps), self._chunk)]
        return torch.cat(parts) if parts else self._catalogue.new_zeros((0, self.n_items))

    @torch.inference_mode()
    def top_k(
        self, users: Tensor, k: int, exclude: Callable[[Tensor, Tensor], None] | None = None,
        history: Tensor | None = None, stored: Tensor | None = None, context: Tensor | None = None,
        task: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(logits, item indices), each [B, min(k, M)], best first. `exclude(rows, scores)` may set scores to -inf
        in place (seen items; `rows` are positions in `users`); such items come back only when fewer than k
        others exist, with -inf. `history`/`stored`/`context` as in `user_repr`, `task` as in `scores`."""
        users = users.to(self.device)
        rows = torch.arange(len(users), device=self.device)
        reps = self.user_repr(users, history, stored, context)
        if self.exact or len(users) == 0 or not self._is_default(task):
            scores = self._scores_of(reps, task)
            if exclude is not None:
                exclude(rows, scores)
            return torch.topk(scores, min(k, self.n_items), dim=1)
        n = shortlist_size(k, self.n_items)
        values, items = [], []
        for s in range(0, len(users), self._chunk):
            scores = self._kernel_scores(reps[s : s + self._chunk])
            if exclude is not None:
                exclude(rows[s : s + self._chunk], scores)
            v, i = torch.topk(scores, n, dim=1)
            values.append(v)
            items.append(i)
        approx, short = torch.cat(values), torch.cat(items)
        exact = self.exact_pairs(reps, short)
        exact[approx == float("-inf")] = float("-inf")  # excluded stays excluded
        top, order = torch.topk(exact, min(k, n), dim=1)
        return top, short.gather(1, order)

    @torch.inference_mode()
    def exact_pairs(self, reps: Tensor, items: Tensor) -> Tensor:
        """fp32 logits [B, s] of user representations reps [B, D] against their own items [B, s]: the model's
        head, exactly what its forward computes from the same representations."""
        return self.model.head(reps[:, None, :], self.model.item_repr(items)).float()


__all__ = ["AllItemsScorer", "PRECISIONS", "bf16_is_fast", "shortlist_size", "reuse_large_allocations"]
