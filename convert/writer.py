"""Output shards written front to back, and the progress record that makes a run resumable.

Every offset is known from the plan, so a shard's safetensors header is written first and each
tensor's bytes are appended as its pieces arrive (memory holds pieces, never a whole shard).
A shard is written as NAME.tmp, flushed to disk, renamed, then recorded with its size, sha256
and tensor list in `convert-progress.json` (itself replaced atomically). On resume, a recorded
shard is kept only if the file is still there with the same size, hash and tensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx

from kimi_mlx.errors import KimiError
from kimi_mlx.files import read_bytes

from .plan import OutTensor, Plan

PROGRESS = "convert-progress.json"


class ShardWriter:
    """One safetensors file, written in plan order and hashed on the way.

    Pieces are written and hashed by one background thread (file writes and sha256 release the
    GIL), so disk output overlaps the next pieces' compute; at most MAX_QUEUED_BYTES wait. Errors
    surface on the next write() or at finish().
    """

    MAX_QUEUED_BYTES = 512 << 20

    def __init__(self, path: Path, tensors: list[OutTensor]):
        header, offset = {}, 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        header["__metadata__"] = {"format": "mlx"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the safetensors writers do
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.sha = hashlib.sha256()
        self.size = 0
        self.f = _guard(self.tmp, lambda: open(self.tmp, "wb"))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-writer")
        self.queued: deque = deque()  # (future, nbytes), oldest first
        self._write(struct.pack("<Q", len(blob)) + blob)

    def _write(self, data) -> None:
        _guard(self.tmp, lambda: self.f.write(data))
        self.sha.update(data)
        self.size += memoryview(data).nbytes

    def write(self, piece: mx.array) -> None:
        piece = mx.contiguous(piece)
        mx.eval(piece)
        self._settle(self.MAX_QUEUED_BYTES - piece.nbytes)
        # The closure keeps `piece` alive until its bytes are on their way to disk.
        self.queued.append((self.pool.submit(lambda: self._write(memoryview(piece))), piece.nbytes))

    def _settle(self, max_queued: int) -> None:
        """Wait for the oldest writes until at most max_queued bytes wait; re-raise their errors."""
        while self.queued and (self.queued[0][0].done() or sum(n for _, n in self.queued) > max_queued):
            future, _ = self.queued.popleft()
            future.result()

    def finish(self) -> dict:
        def close():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)

        self._settle(-1)
        self.pool.shutdown()
        _guard(self.tmp, close)
        return {"size": self.size, "sha256": self.sha.hexdigest()}

    def abandon(self) -> None:
        """Stop after an error or an interrupt. The .tmp stays (resume deletes it); closing may fail
        again (on a full disk the buffered bytes cannot be flushed): the first error is the one to report."""
        self.pool.shutdown(cancel_futures=True)
        try:
            self.f.close()
        except OSError:
            pass


class Sink:
    """Takes output pieces group by group and writes them to the shards in plan order.

    Pieces of the tensor being written go straight to disk; pieces of a later tensor of the same
    group (e.g. scales while the weight streams) wait in memory. Tensors in shards that are
    already complete are dropped.
    """

    def __init__(self, folder: Path, plan: Plan, progress: "Progress", on_tensor=None):
        self.folder, self.plan, self.progress = folder, plan, progress
        self.order = [(i, t) for i, shard in enumerate(plan.shards) for t in shard]
        self.shard_of = {t.name: i for i, t in self.order}
        self.pos, self.filled, self.pending = 0, 0, {}
        self.writer: ShardWriter | None = None
        self.on_tensor = on_tensor or (lambda: None)

    def done(self, shard: int) -> bool:
        return self.plan.shard_names[shard] in self.progress.shards

    def put(self, name: str, piece: mx.array) -> None:
        if self.done(self.shard_of[name]):
            return
        self.pending.setdefault(name, []).append(piece)
        self._drain()

    def _drain(self) -> None:
        while self.pos < len(self.order):
            shard, t = self.order[self.pos]
            if self.done(shard):
                self.pos += 1
                continue
            pieces = self.pending.pop(t.name, [])
            if self.writer is None:
                self.writer = ShardWriter(self.folder / self.plan.shard_names[shard], self.plan.shards[shard])
            for piece in pieces:
                self.writer.write(piece)
                self.filled += piece.nbytes
            if self.filled < t.nbytes:
                return
            if self.filled > t.nbytes:
                raise RuntimeError(f"internal error: {t.name} got {self.filled} bytes, planned {t.nbytes}")
            self.pos, self.filled = self.pos + 1, 0
            self.on_tensor()
            if self.pos == len(self.order) or self.order[self.pos][0] != shard:
                record = self.writer.finish()
                self.writer = None
                self.progress.add(self.plan.shard_names[shard], record, [x.name for x in self.plan.shards[shard]])

    def check_group_done(self) -> None:
        if self.pending:
            raise RuntimeError(f"internal error: pieces left unwritten: {sorted(self.pending)[:3]}")

    def close(self) -> None:
        if self.writer is not None:  # interrupted mid-shard: the .tmp stays, resume rewrites it
            self.writer.abandon()


class Progress:
    """`convert-progress.json` in DST.partial: the plan's fingerprint and the shards complete."""

    def __init__(self, folder: Path, fingerprint: str, source: dict | None = None):
        self.path, self.fingerprint, self.source = folder / PROGRESS, fingerprint, source
        self.shards: dict[str, dict] = {}

    @classmethod
    def resume(cls, folder: Path, plan: Plan, log) -> "Progress":
        """Read the record and keep the shards that verify; clear everything else in the folder."""
        progress = cls(folder, plan.fingerprint, plan.source_id)
        try:  # bounded: a record that is a link to /dev/zero is damaged, not read until memory runs out
            saved = json.loads(read_bytes(progress.path, "starting over"))
            saved = saved if isinstance(saved, dict) else {}
        except (KimiError, ValueError, RecursionError):
            saved = {}
        if saved.get("fingerprint") == plan.fingerprint:
            expected = {n: [t.name for t in s] for n, s in zip(plan.shard_names, plan.shards)}
            shards = saved.get("shards")
            for name, record in (shards.items() if isinstance(shards, dict) else ()):  # a damaged record: none kept
                if (isinstance(record, dict) and name in expected and record.get("tensors") == expected[name]
                        and _verify(folder / name, record)):
                    progress.shards[name] = record
        elif saved.get("source") not in (None, plan.source_id):
            log(f"{folder}: started from another source ({_describe(saved['source'])}), not "
                f"{_describe(plan.source_id)}; starting over (shards of two checkpoints are never mixed)")
        elif saved:
            log(f"{folder}: made with other options; starting over")
        for path in folder.iterdir():  # stale temp files, unverified shards, old metadata
            if path.name not in progress.shards and not path.is_dir():
                path.unlink()
        if progress.shards:
            log(f"resuming {folder}: {len(progress.shards)} of {len(plan.shards)} shards already complete")
        progress._save()
        return progress

    def add(self, shard: str, record: dict, tensors: list[str]) -> None:
        self.shards[shard] = {**record, "tensors": tensors}
        self._save()

    def bytes_done(self) -> int:
        return sum(r["size"] for r in self.shards.values())

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        text = json.dumps({"fingerprint": self.fingerprint, "source": self.source, "shards": self.shards}, indent=1)
        _guard(tmp, lambda: tmp.write_text(text))
        os.replace(tmp, self.path)


def _describe(source) -> str:
    if not isinstance(source, dict):
        return "unknown"
    if source.get("repo"):
        return f"{source['repo']} at {source.get('revision') or 'an unknown revision'}"
    return f"{source.get('folder')} as of its shards' sizes and times"


def _verify(path: Path, record: dict) -> bool:
    if not path.is_file() or path.stat().st_size != record.get("size"):
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            sha.update(block)
    return sha.hexdigest() == record.get("sha256")


def _guard(path: Path, fn):
    """Run a file operation; a full disk or an I/O error becomes one KimiError line naming the file."""
    try:
        return fn()
    except OSError as e:
        raise io_error(path, e) from None


def io_error(path: Path, e: OSError) -> KimiError:
    """One line for an OSError while writing the output: a full disk (or quota) says how to resume."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return KimiError(f"{path}: disk full; free some space and run the same command again "
                         "to resume (complete shards are kept)")
    return KimiError(f"{path}: cannot write ({e.strerror or e}); the same command resumes once that is fixed")
