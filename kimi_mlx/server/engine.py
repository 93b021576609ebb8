"""The model thread: continuous batching of generation requests.

One thread owns the model. Each turn of its loop it
  1. drops cancelled requests (a client that went away frees its row at once),
  2. admits waiting requests while the batch has room (`max_batch` rows prefilling or decoding;
     beyond that `max_queue` requests wait, and more are refused with QueueFull -> HTTP 429),
  3. runs one prefill step (at most `prefill_step` tokens) of an admitted request (round robin),
     batched with the next chunks of other short prompts (left padding and masks: the logits
     are each request's own), from the longest state-cache snapshot that prefixes its prompt,
     snapshotting at the message boundaries it was given,
  4. runs one decode step for every decoding row at once: the rows' caches are merged into one
     batched cache (kimi_mlx/server/batch_cache.py: KDA states concatenated, MLA latents
     left-padded with a key mask), a row joins after its prefill and leaves when it finishes.
     Steps are pipelined: step k+1 is queued (async_eval) on step k's still-lazy tokens before
     step k's tokens are read and delivered, so host work overlaps the compute.
So a long prompt never stalls the decoding rows for more than one prefill step, and rows of
different lengths decode together. Each request's tokens, text (kimi_mlx.generate.ReplyText:
detokenizer, eos, max_tokens, stop strings) and logprobs go to its `deliver` callback as
Events. One request's failure is delivered to it (or to the rows of a failed decode step) and
the loop goes on.

Under mlx.launch (kimi_mlx/server/lockstep.py) every rank runs this loop: rank 0's turns start
with a tick (new requests, cancellations, stop) that the other ranks receive, and sampled tokens
are rank 0's, so every rank makes the same model calls on its shard of the model; there a failed
step ends the engine on every rank (the ranks cannot skip a step together).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ..errors import KimiError
from ..generate import DEFAULT_PREFILL_STEP, ReplyText
from .batch_cache import extract_row, merge_caches, select_rows, split_rows
from .lockstep import Lockstep, Tick, digest, request_fields
from .sampling import RowSampler, SamplingParams
from .state_cache import StateCache

log = logging.getLogger("kimi_mlx.server")
# Requests prefill together (left-padded into one batch) while their caches stay this short:
# merging and splitting copies each row's latent cache, cheap for short prompts, not for long ones.
BATCH_PREFILL_MAX_TOKENS = 4096
# Under ranks an idle rank 0 still ticks this often (s): the other ranks sleep between ticks instead of
# spinning inside a collective, both sides' watchdogs see a live peer, and a request arriving at an
# idle server waits at most this long for the other ranks.
IDLE_TICK_S = 0.1


class QueueFull(KimiError):
    """Every batch row is busy and the wait queue is full (HTTP 429)."""


class ShuttingDown(KimiError):
    """The server is draining and takes no new requests (HTTP 503)."""


@dataclass
class Event:
    """One step of a request's output. text: new reply text (may be empty while a possible stop
    string is held back); finish_reason set on the last event; error set instead on failure."""

    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    error: str | None = None


@dataclass
class Request:
    ids: list[int]  # prompt token ids
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's; n: and the n most likely
    snapshot_at: list[int] = field(default_factory=list)  # prompt prefix lengths to snapshot at
    snapshot_reply: bool = True  # snapshot what the request consumed when it ends
    ignore_eos: bool = False  # for benchmarks: run to max_tokens
    deliver: Callable[[Event], None] = lambda ev: None

    # engine-side state
    serial: int = -1  # set by submit: the ranks name a request by it
    cancelled: bool = False
    cache: list | None = None
    pos: int = 0  # prompt tokens consumed by cache
    cached_tokens: int = 0  # of them, restored from the state cache
    pending: int | None = None  # sampled, not yet fed to the model
    fed: int = 0  # generated tokens fed to the model (a launched step counts)
    done: bool = False  # finished, failed or cancelled: results still in flight are dropped
    generated: list[int] = field(default_factory=list)
    reply: ReplyText | None = None
    sampler: RowSampler | None = None
    t_submit: float = 0.0
    t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Step:
    rows: list[Request]  # the batch rows of the step, in order
    lazy: tuple  # (tokens [B], chosen logprobs [B] | None, top | None), maybe not evaluated yet


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_step: int = DEFAULT_PREFILL_STEP, kv_bits: int | None = None,
                 state_cache: StateCache | None = None, max_prefill_batch: int = 8,
                 lockstep: Lockstep | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.lockstep = lockstep or Lockstep()  # one process; lockstep.RankLockstep under mlx.launch
        self.max_prefill_batch = max_prefill_batch
        self.max_batch, self.max_queue, self.prefill_step, self.kv_bits = max_batch, max_queue, prefill_step, kv_bits
        self.state_cache = state_cache
        self.incoming: deque[Request] = deque()  # submitted, not yet taken in by a tick
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.rows: list[Request] = []  # decode batch, in cache row order
        self.batch_cache: list | None = None
        self.inflight: _Step | None = None  # the decode step launched last, its tokens not yet delivered
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self._serials = itertools.count()
        self._gone: set[int] = set()  # serials of the requests the current tick cancels
        self._ticked = False  # a first tick was taken
        self.fatal: KimiError | None = None  # why the engine ended under ranks (serve raises it)
        self.on_fatal: Callable[[KimiError], None] | None = None  # rank 0: stops the HTTP server
        # counters for /metrics
        self.stats = dict(requests=0, finished=0, cancelled=0, failed=0, prompt_tokens=0, cached_tokens=0,
                          generated_tokens=0, decode_steps=0, prefill_steps=0)

    # ---- called from other threads

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="kimi-mlx-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull when all rows are busy and the queue is full."""
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            busy = len(self.rows) + len(self.prefilling)
            waiting = len(self.waiting) + len(self.incoming)
            if busy + waiting >= self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {busy} requests running and {waiting} waiting "
                                f"(limits {self.max_batch} and {self.max_queue}); retry later")
            req.t_submit = time.perf_counter()
            req.serial = next(self._serials)
            self.incoming.append(req)
            self.stats["requests"] += 1
            self.cond.notify()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; finish the running ones (drain) or cancel them; join the thread."""
        with self.cond:
            self.stopping = True
            if not drain:
                for r in [*self.incoming, *self.waiting, *self.prefilling, *self.rows]:
                    r.cancel()
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def load(self) -> dict:
        return dict(waiting=len(self.waiting) + len(self.incoming), prefilling=len(self.prefilling),
                    decoding=len(self.rows))

    # ---- the model thread

    def follow(self) -> None:
        """A rank other than 0: run rank 0's engine turns here until it stops (kimi_mlx/server/
        lockstep.py). Raises RankError when rank 0 is lost or the ranks drift apart."""
        self._loop()
        if self.fatal is not None:
            raise self.fatal

    def _busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.rows or self.inflight)

    def _loop(self) -> None:
        step = self.lockstep
        while True:
            if not step.follower:
                with self.cond:
                    if step.ranks > 1:  # rank 0 ticks at least every IDLE_TICK_S: the heartbeat of the ranks
                        if not (self.incoming or self._busy() or self.stopping):
                            self.cond.wait(IDLE_TICK_S)
                    else:
                        while not (self.incoming or self._busy() or self.stopping):
                            self.cond.wait()
            # under ranks: a peer that stops answering (no tick, no step) ends this rank; a follower's
            # wait for rank 0's first tick is not watched (rank 0 starts its HTTP server first)
            watch = step.watch() if self._ticked or not step.follower else contextlib.nullcontext()
            try:
                with watch:
                    if not self._tick():
                        return
                    self._drop_cancelled()
                    self._admit()
                    self._prefill_step()
                    self._decode_step()
            except Exception as e:  # noqa: BLE001 - the loop must survive anything one step does
                if step.ranks == 1:
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    continue
                self._die(e)
                return
            if step.follower and not self._busy():
                # Idle: rank 0's next tick is about IDLE_TICK_S away. A rank waiting inside a collective
                # spins a core (the ring backend polls), so sleep through most of the gap.
                time.sleep(IDLE_TICK_S * 0.9)

    def _tick(self) -> bool:
        """Start a turn: take in the requests submitted since the last one and the cancellations
        (rank 0 decides them and sends them to the other ranks, which take them in the same way).
        False: the engine stops (stopping, and nothing is left to finish)."""
        mine = digest((self.waiting, self.prefilling, self.rows), len(self.state_cache or ())) \
            if self.lockstep.ranks > 1 else 0
        if self.lockstep.follower:
            tick = self.lockstep.receive(mine)
            new = [Request(ids=f["ids"], max_tokens=f["max_tokens"], sampling=SamplingParams(**f["sampling"]),
                           stop=f["stop"], top_logprobs=f["top_logprobs"], snapshot_at=f["snapshot_at"],
                           snapshot_reply=f["snapshot_reply"], ignore_eos=f["ignore_eos"], serial=f["serial"])
                   for f in tick.new]
            self.waiting.extend(new)
            self.stats["requests"] += len(new)
        else:
            with self.cond:
                new = list(self.incoming)
                self.incoming.clear()
                self.waiting.extend(new)
                gone = [r.serial for r in (*self.waiting, *self.prefilling, *self.rows) if r.cancelled]
                stop = self.stopping and not self._busy()
            tick = Tick([request_fields(r) for r in new] if self.lockstep.ranks > 1 else [], gone, stop)
            self.lockstep.send(tick, mine)
        self._gone = set(tick.gone)  # fixed for this turn (a client may go away meanwhile)
        self._ticked = True
        return not tick.stop

    def _die(self, error: Exception) -> None:
        """Under ranks: a step failed or a peer was lost. Every request gets the error, the engine
        stops, and rank 0's HTTP server is told to stop (on_fatal); a follower raises it (follow)."""
        from ..parallel.world import RankError, peer_error

        self.fatal = peer_error(error) or (error if isinstance(error, KimiError) else RankError(
            f"rank {self.lockstep.rank}: an engine step failed ({type(error).__name__}: {error}); the ranks "
            "cannot go on out of step: stopping"))
        if self.lockstep.rank == 0 and not isinstance(error, KimiError) and peer_error(error) is None:
            log.error("engine step failed:\n%s", traceback.format_exc())  # a bug: the server's log gets where
        with self.cond:
            self.stopping = True
            reqs = [*self.incoming, *self.waiting, *self.prefilling, *self.rows,
                    *(self.inflight.rows if self.inflight else [])]
            self.incoming.clear()
        for r in {id(r): r for r in reqs}.values():
            if not r.done:
                self._fail(r, str(self.fatal))
        self.waiting.clear()
        self.prefilling.clear()
        self.rows, self.batch_cache, self.inflight = [], None, None
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)

    def _must_stop(self) -> None:
        """Called in an except block: under ranks a failed step is not skipped but ends the engine
        (the other ranks ran it, or wait inside it), so re-raise to _loop."""
        if self.lockstep.ranks > 1:
            raise  # noqa: PLE0704 - re-raises the exception being handled by the caller

    def _finish(self, req: Request, ev: Event, cache: list | None) -> None:
        req.done = True
        if cache is not None and req.snapshot_reply:
            self._snapshot(req.ids + req.generated[:req.fed], cache)  # the tokens the cache has consumed
        self.stats["finished"] += 1
        req.cache = None
        req.deliver(ev)

    def _snapshot(self, tokens: list[int], cache: list) -> None:
        """Keep the state for later requests; a snapshot is only a saving, so its failure (a full
        spill disk, say) is logged and never fails a request."""
        if self.state_cache is None:
            return
        try:
            self.state_cache.insert(tokens, cache)
        except Exception:  # noqa: BLE001
            self._must_stop()
            log.error("state snapshot failed:\n%s", traceback.format_exc())

    def _fail(self, req: Request, message: str) -> None:
        req.done = True
        self.stats["failed"] += 1
        req.cache = None
        req.deliver(Event(finish_reason="error", error=message))

    def _drop_cancelled(self) -> None:
        """Requests the tick found cancelled leave (their serials: the same set on every rank)."""
        for r in [*self.waiting, *self.prefilling, *self.rows]:
            if r.serial in self._gone:
                r.cancelled = True
        with self.cond:
            for q in (self.waiting, self.prefilling):
                gone = [r for r in q if r.serial in self._gone]
                for r in gone:
                    q.remove(r)
                    r.cache = None
                    self.stats["cancelled"] += 1
        for r in self.rows:
            r.done = r.done or r.serial in self._gone
        keep = [i for i, r in enumerate(self.rows) if r.serial not in self._gone]
        if len(keep) < len(self.rows):
            self.stats["cancelled"] += len(self.rows) - len(keep)
            self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.batch_cache = [], None
            return
        if len(keep) < len(self.rows):
            self.batch_cache = select_rows(self.batch_cache, keep)
            self.rows = [self.rows[i] for i in keep]

    def _admit(self) -> None:
        with self.cond:
            while self.waiting and len(self.rows) + len(self.prefilling) < self.max_batch:
                self.prefilling.append(self.waiting.popleft())

    def _prefill_step(self) -> None:
        """One prefill step: the next chunk (up to `prefill_step` tokens, or to the next snapshot
        boundary) of the first admitted request, together with the next chunks of other requests
        whose caches stay short (<= BATCH_PREFILL_MAX_TOKENS), left-padded into one batch; longer
        prompts take their steps alone, in turn (a long prompt does not hold back short ones)."""
        if not self.prefilling:
            return
        head = self.prefilling[0]
        group = [head]
        try:
            self._open(head)
            if self._short(head):
                for r in list(self.prefilling)[1:]:
                    if len(group) >= self.max_prefill_batch:
                        break
                    self._open(r)
                    if self._short(r):
                        group.append(r)
            spans = [(r.pos, self._chunk_end(r)) for r in group]
            if len(group) == 1:
                (a, b), = spans
                logits = self.model(mx.array(head.ids[a:b])[None], cache=head.cache, last_only=True)  # [1, 1, V]
                mx.eval(logits, [c.state for c in head.cache])
            else:
                logits = self._prefill_batch(group, spans)
            self.stats["prefill_steps"] += 1
        except Exception as e:  # noqa: BLE001 - these requests fail, the server goes on
            self._must_stop()
            log.error("prefill failed:\n%s", traceback.format_exc())
            for r in group:
                if r in self.prefilling:
                    self.prefilling.remove(r)
                self._fail(r, f"prefill failed: {type(e).__name__}: {e}")
            return
        done = []
        for i, (r, (_, end)) in enumerate(zip(group, spans)):
            r.pos = end
            if end in r.snapshot_at:
                self._snapshot(r.ids[:end], r.cache)
            if end == len(r.ids):
                done.append(i)
        for i in done:
            self.prefilling.remove(group[i])
        if head in self.prefilling:
            self.prefilling.remove(head)
            self.prefilling.append(head)  # round robin
        if done:
            self._start_replies([group[i] for i in done], logits[mx.array(done), -1])

    def _open(self, req: Request) -> None:
        """Give a request its cache: the longest state-cache snapshot of its prompt, or a fresh one."""
        if req.cache is not None:
            return
        n, cache = (0, None) if self.state_cache is None else self.state_cache.lookup(req.ids)
        req.cache = cache if cache is not None else self.model.make_cache(self.kv_bits)
        req.pos = req.cached_tokens = n
        self.stats["prompt_tokens"] += len(req.ids)
        self.stats["cached_tokens"] += n

    def _chunk_end(self, req: Request) -> int:
        end = min(req.pos + self.prefill_step, len(req.ids))
        later = [b for b in req.snapshot_at if req.pos < b < end]
        return later[0] if later else end  # stop at a boundary to snapshot there

    def _short(self, req: Request) -> bool:
        return self._chunk_end(req) <= BATCH_PREFILL_MAX_TOKENS

    def _prefill_batch(self, group: list[Request], spans: list[tuple[int, int]]) -> mx.array:
        """The chunks of several requests in one call: their caches merged, the chunks left-padded
        (mask 0: KDA and MLA leave padding out of every row's state), then each row's cache taken
        back without its padding. -> logits [B, 1, V] of each row's last token."""
        T = max(b - a for a, b in spans)
        pad = self.tokenizer.pad_token_id or 0
        ids = mx.array([[pad] * (T - (b - a)) + r.ids[a:b] for r, (a, b) in zip(group, spans)], dtype=mx.int32)
        mask = mx.array([[0] * (T - (b - a)) + [1] * (b - a) for a, b in spans], dtype=mx.int32)
        cache = merge_caches([r.cache for r in group])
        logits = self.model(ids, cache=cache, mask=mask, last_only=True)  # [B, 1, V]
        mx.eval(logits, [c.state for c in cache])
        for r, row in zip(group, split_rows(cache)):
            r.cache = row
        return logits

    def _start_replies(self, reqs: list[Request], logits: mx.array) -> None:
        """Sample the first token of each request whose prompt is in; the unfinished join the batch."""
        for r in reqs:
            r.reply = ReplyText(self.tokenizer, r.max_tokens, r.stop)
            if r.ignore_eos:
                r.reply.eos = set()
            r.sampler = RowSampler(r.sampling)
        joining = []
        try:
            sampled = self._sample(reqs, logits)
        except Exception as e:  # noqa: BLE001
            self._must_stop()
            log.error("sampling failed:\n%s", traceback.format_exc())
            for r in reqs:
                if not r.done:
                    self._fail(r, f"sampling failed: {type(e).__name__}: {e}")
            return
        for r, (token, lp) in zip(reqs, sampled):
            if r.done:  # its sampler failed
                continue
            try:
                if not self._emit(r, token, lp, r.cache):
                    joining.append(r)
                else:
                    r.cache = None
            except Exception as e:  # noqa: BLE001
                self._must_stop()
                log.error("emit failed:\n%s", traceback.format_exc())
                self._fail(r, f"{type(e).__name__}: {e}")
        if joining:
            parts = ([self.batch_cache] if self.batch_cache is not None else []) + [r.cache for r in joining]
            self.batch_cache = parts[0] if len(parts) == 1 else merge_caches(parts)
            self.rows.extend(joining)
            for r in joining:
                r.cache = None

    def _decode_step(self) -> None:
        """Launch the next decode step for every row (asynchronously), then deliver the tokens of
        the step launched before it: the host's work (graph building, text, delivery) overlaps
        the device's. A row that finishes on a delivered token was already fed it by the new
        step; it leaves the batch now and its snapshot includes that token."""
        prev, self.inflight = self.inflight, None
        try:
            if self.rows:
                self.inflight = self._launch(prev)
        except Exception as e:  # noqa: BLE001 - these rows fail, the server goes on
            self._must_stop()
            log.error("decode step failed:\n%s", traceback.format_exc())
            self._fail_batch(f"decode failed: {type(e).__name__}: {e}", prev)
            return
        if prev is None:
            return
        try:
            results = self._read(prev.rows, prev.lazy)
        except Exception as e:  # noqa: BLE001
            self._must_stop()
            log.error("decode step failed:\n%s", traceback.format_exc())
            self._fail_batch(f"decode failed: {type(e).__name__}: {e}", prev)
            return
        index = {id(r): i for i, r in enumerate(self.rows)}
        for r, (token, lp) in zip(prev.rows, results):
            if r.done:
                continue
            try:
                self._emit(r, token, lp, None, row=index[id(r)])
            except Exception as e:  # noqa: BLE001
                self._must_stop()
                log.error("emit failed:\n%s", traceback.format_exc())
                self._fail(r, f"{type(e).__name__}: {e}")
        self._drop_done()

    def _drop_done(self) -> None:
        """Rows that finished or failed leave the batch."""
        if any(r.done for r in self.rows):
            self._keep_rows([i for i, r in enumerate(self.rows) if not r.done])

    def _launch(self, prev: "_Step | None") -> "_Step":
        """Queue one decode step of all rows: each feeds the token the previous step sampled for
        it (still lazy) or, having just joined, the first token of its reply."""
        if prev is not None and [id(r) for r in prev.rows] == [id(r) for r in self.rows]:
            inputs = prev.lazy[0]
        else:
            where = {} if prev is None else {id(r): i for i, r in enumerate(prev.rows)}
            inputs = mx.concatenate([prev.lazy[0][where[id(r)]:where[id(r)] + 1] if id(r) in where
                                     else mx.array([r.pending], dtype=mx.int32) for r in self.rows])
        logits = self.model(inputs[:, None], cache=self.batch_cache)[:, -1]  # [B, V]
        lazy = self._sample_lazy(self.rows, logits)
        mx.async_eval(*(a for a in lazy if a is not None), *[c.state for c in self.batch_cache])
        for r in self.rows:
            r.fed += 1
        self.stats["decode_steps"] += 1
        step = _Step(list(self.rows), lazy)
        self._drop_done()  # a row whose sampler failed
        return step

    def _fail_batch(self, message: str, prev: "_Step | None") -> None:
        for r in {id(r): r for r in [*self.rows, *(prev.rows if prev else [])]}.values():
            if not r.done:
                self._fail(r, message)
        self.rows, self.batch_cache, self.inflight = [], None, None

    def _sample(self, reqs: list[Request], logits: mx.array):
        """logits [B, V] -> per row (token, (logprob | None, top [(id, logprob)] | None))."""
        return self._read(reqs, self._sample_lazy(reqs, logits))

    def _sample_lazy(self, reqs: list[Request], logits: mx.array):
        """logits [B, V] -> (tokens [B] int32, chosen logprobs [B] | None, (top ids, top logprobs) [B, k] | None)."""
        logits = logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [B, V]
        tokens = mx.argmax(logprobs, axis=-1)  # [B]: one op for every greedy row
        if not all(r.sampler.greedy for r in reqs):
            parts = []
            for i, r in enumerate(reqs):
                try:
                    parts.append(tokens[i:i + 1] if r.sampler.greedy else r.sampler(logprobs[i:i + 1]))
                except Exception as e:  # noqa: BLE001 - this request fails (and leaves), not its batch
                    self._must_stop()
                    log.error("sampling failed:\n%s", traceback.format_exc())
                    self._fail(r, f"sampling failed: {type(e).__name__}: {e}")
                    parts.append(tokens[i:i + 1])
            tokens = mx.concatenate(parts)
        tokens = self.lockstep.broadcast(tokens.astype(mx.int32))  # under ranks: rank 0's tokens, in the graph
        chosen = top = None
        if any(r.top_logprobs is not None for r in reqs):
            chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # [B]
        k = max((r.top_logprobs or 0) for r in reqs)
        if k > 0:
            top_ids = mx.argpartition(-logprobs, k - 1, axis=-1)[:, :k]  # [B, k]
            top = (top_ids, mx.take_along_axis(logprobs, top_ids, axis=-1))
        return tokens, chosen, top

    def _read(self, reqs: list[Request], lazy) -> list[tuple[int, tuple]]:
        """Wait for a sampled step; per row (token, (logprob | None, top [(id, logprob)] | None))."""
        tokens, chosen, top = lazy
        tokens_l = tokens.tolist()
        chosen_l = chosen.tolist() if chosen is not None else [None] * len(reqs)
        top_l = (top[0].tolist(), top[1].tolist()) if top is not None else None
        out = []
        for i, r in enumerate(reqs):
            top_i = None
            if r.top_logprobs:
                top_i = sorted(zip(top_l[0][i], top_l[1][i]), key=lambda p: -p[1])[: r.top_logprobs]
            out.append((tokens_l[i], (chosen_l[i], top_i)))
        return out

    def _emit(self, req: Request, token: int, lp, cache: list | None, row: int | None = None) -> bool:
        """Deliver one sampled token; True when the request is finished (and delivered its end)."""
        if req.t_first is None:
            req.t_first = time.perf_counter()
        req.generated.append(token)
        self.stats["generated_tokens"] += 1
        text, finish = req.reply.add(token)
        logprob, top = lp
        ev = Event(text=text, token=token, logprob=logprob if req.top_logprobs is not None else None,
                   top_logprobs=top, finish_reason=finish)
        if finish is None:
            req.pending = token
            req.deliver(ev)
            return False
        ev.usage = dict(prompt_tokens=len(req.ids), completion_tokens=len(req.generated),
                        cached_tokens=req.cached_tokens)
        if cache is None and self.state_cache is not None and req.snapshot_reply and req.fed > 0:
            cache = extract_row(self.batch_cache, row)
        self._finish(req, ev, cache)
        return True
