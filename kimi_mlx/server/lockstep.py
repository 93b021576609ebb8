"""The server's engine on several ranks (mlx.launch): rank 0 decides, every rank runs the same steps.

Only rank 0 serves HTTP. Its engine loop starts each turn with a *tick*: the requests that
arrived since the last turn, the requests whose clients went away, and whether to stop. The
tick goes to the other ranks through mx.distributed (a broadcast as an all_sum to which only
rank 0 adds: a fixed header of HEADER int32, then the payload, JSON bytes packed into int32),
and their engines, which run without HTTP, take it in exactly as rank 0's did. From there
every decision of the turn (admission, prefill chunks and batches, which rows join and leave
the decode batch, state-cache snapshots and hits) is a deterministic function of the engine's
state and the tokens, and the tokens are rank 0's: sampling broadcasts them inside the step's
graph (Lockstep.broadcast, as generation does). So every rank makes the same model calls, the
collectives inside them match, and each rank's caches hold its shard of the same states.

A digest of each engine's queues (request serials, prompt positions, tokens fed) travels with
the tick: a rank whose engine drifted from rank 0's stops with one line instead of running
mismatched collectives. Under ranks a failed step cannot be skipped (the other ranks ran it or
wait inside it): the engine ends on any step error (engine._die), where one process would fail
the step's requests and go on.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from ..parallel.world import RankError, broadcast_token, watch_ranks

HEADER = 8  # int32: [MAGIC, stop, payload bytes, digest, 0, 0, 0, 0]
MAGIC = 0x4B4D4C58  # "KMLX": the ranks are in the same collective


@dataclass
class Tick:
    """What rank 0 decided at the start of an engine turn."""

    new: list[dict] = field(default_factory=list)  # requests that arrived (request_fields)
    gone: list[int] = field(default_factory=list)  # serials of requests whose client went away
    stop: bool = False  # the engine ends after this tick


def request_fields(req) -> dict:
    """The fields of an engine Request that decide its steps on every rank (not its delivery)."""
    return dict(serial=req.serial, ids=list(req.ids), max_tokens=req.max_tokens, stop=list(req.stop),
                top_logprobs=req.top_logprobs, snapshot_at=list(req.snapshot_at), snapshot_reply=req.snapshot_reply,
                ignore_eos=req.ignore_eos, sampling=asdict(req.sampling))


class Lockstep:
    """One process: ticks go nowhere, tokens stay as sampled."""

    ranks, rank, follower = 1, 0, False

    def send(self, tick: Tick, digest: int) -> None:
        pass

    def receive(self, digest: int) -> Tick:  # pragma: no cover - only followers receive
        raise RuntimeError("a single process receives no ticks")

    def broadcast(self, tokens):
        return tokens

    def watch(self):
        return contextlib.nullcontext()

    def agree_on(self, settings: dict) -> None:
        pass


class RankLockstep(Lockstep):
    """Rank `group.rank()` of `group`: rank 0 sends ticks, the others receive them."""

    def __init__(self, group):
        self.group, self.ranks, self.rank = group, group.size(), group.rank()
        self.follower = self.rank != 0

    def _bcast(self, values: np.ndarray) -> np.ndarray:
        """Rank 0's int32 `values` on every rank (the others pass zeros of the same shape)."""
        import mlx.core as mx

        mine = mx.array(values) if self.rank == 0 else mx.zeros(values.shape, dtype=mx.int32)
        out = mx.distributed.all_sum(mine, group=self.group)
        mx.eval(out)
        return np.array(out)

    def send(self, tick: Tick, digest: int) -> None:
        payload = b"" if not (tick.new or tick.gone) else json.dumps(
            {"new": tick.new, "gone": tick.gone}, separators=(",", ":")).encode()
        self._bcast(np.array([MAGIC, int(tick.stop), len(payload), digest, 0, 0, 0, 0], dtype=np.int32))
        if payload:
            self._bcast(_pack(payload))

    def receive(self, digest: int) -> Tick:
        header = self._bcast(np.zeros(HEADER, dtype=np.int32))
        magic, stop, size, theirs = (int(v) for v in header[:4])
        if magic != MAGIC:
            raise RankError(f"rank {self.rank}: rank 0 sent something other than an engine step "
                            f"(header {header.tolist()}); start every rank with the same kimi-mlx serve command")
        if theirs != digest:
            raise RankError(f"rank {self.rank}: its requests drifted from rank 0's (engine digest {digest} vs "
                            f"{theirs}); the ranks cannot stay in step: stopping (a bug: please report it)")
        tick = Tick(stop=bool(stop))
        if size:
            body = json.loads(self._bcast(np.zeros((size + 3) // 4, dtype=np.int32)).tobytes()[:size])
            tick.new, tick.gone = body["new"], body["gone"]
        return tick

    def broadcast(self, tokens):
        return broadcast_token(tokens, self.group)

    def watch(self):
        return watch_ranks()

    def agree_on(self, settings: dict) -> None:
        """Every rank's engine settings must be rank 0's (each runs its own copy of the command):
        RankError on every rank otherwise."""
        import mlx.core as mx

        mine = zlib.crc32(json.dumps(settings, sort_keys=True).encode()) & 0x7FFFFFFF
        every = mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=self.group).tolist()
        differ = [r for r, v in enumerate(every) if v != every[0]]
        if differ:
            raise RankError(f"rank {self.rank}: ranks {differ} were started with other serve options than rank 0 "
                            f"(here {settings}); start every rank with the same command")


def _pack(data: bytes) -> np.ndarray:
    return np.frombuffer(data + b"\0" * (-len(data) % 4), dtype=np.int32)


def digest(queues, cache_entries: int) -> int:
    """A 31-bit digest of the engine's queues (each request's serial, prompt position, tokens fed
    and generated) and of the state cache's size: equal on ranks that are in step."""
    parts = [[(r.serial, r.pos, r.fed, len(r.generated)) for r in q] for q in queues]
    return zlib.crc32(json.dumps([parts, cache_entries]).encode()) & 0x7FFFFFFF
