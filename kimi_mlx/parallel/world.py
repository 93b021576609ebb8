"""The ranks of a run started by `mlx.launch`: joining them, agreeing, and failing in one line.

Everything goes through mx.distributed (ring over TCP/Thunderbolt, JACCL, MPI, NCCL on CUDA;
mlx.launch sets MLX_RANK and MLX_HOSTFILE or the backend's own variables). Here:
  * join_world(): mx.distributed.init with a connection deadline. The ring backend waits for
    missing peers forever and holds the GIL meanwhile (a Python timer never runs), so a forked
    watchdog process ends this rank with one line when the deadline passes;
  * rank 0 is the one that talks to the user: the others' stdout is dropped and their stderr
    keeps only the CLI's `error:` lines (mlx.launch prints every rank's output); the ring
    backend's own socket messages are dropped on every rank (the CLI says it in one line);
  * checkpoint_fingerprint / check_same_checkpoint: every rank must load the same weights;
  * broadcast_token: rank 0's sampled token, so every rank continues the same sequence;
  * peer_error(): a lost connection (a rank that died) as one KimiError line instead of a
    traceback (the backend raises RuntimeError "[ring] connection to a peer was lost");
  * watch_ranks() / progress(): a host that vanishes (power, sleep, cable) closes no socket, and
    the ring backend would wait for it forever; while a generation runs (steps are in lockstep;
    loading is not: a slow disk is not a hang), a forked watchdog ends this rank with one line when
    no step made progress for $KIMI_MLX_STEP_TIMEOUT s (300): SIGTERM, then SIGKILL 3 s later (a
    server's SIGTERM handler would wait for connections that wait on the lost rank).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import select
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import KimiError

CONNECT_TIMEOUT_ENV = "KIMI_MLX_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 120.0
STEP_TIMEOUT_ENV = "KIMI_MLX_STEP_TIMEOUT"
DEFAULT_STEP_TIMEOUT_S = 300.0
_EXCEPTION_LINE = re.compile(rb"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")
LAUNCH_VARS = ("MLX_RANK", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MLX_JACCL_COORDINATOR")


class RankError(KimiError):
    """A failure of the group of ranks (a peer lost, ranks that disagree): one line naming the rank."""


def launched() -> bool:
    """True when this process was started as one rank of several (mlx.launch, mpirun)."""
    return any(v in os.environ for v in LAUNCH_VARS)


def _seconds(env: str, default: float, what: str) -> float:
    value = os.environ.get(env, str(default))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise KimiError(f"{env}={value!r}: give the seconds to wait for {what} (> 0)")
    return seconds


def connect_timeout() -> float:
    return _seconds(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S, "the other ranks")


def join_world(timeout: float | None = None):
    """The group of all ranks (mx.distributed.init); a group of 1 when not launched as ranks.

    A peer that does not connect within `timeout` seconds ($KIMI_MLX_CONNECT_TIMEOUT, 120)
    ends this process with one `error:` line and SIGTERM (the backend itself would wait forever)."""
    import mlx.core as mx

    if not launched():
        return mx.distributed.init()
    timeout = connect_timeout() if timeout is None else timeout
    step = _seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT_S, "a step of the other ranks")
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    stop = _watchdog(timeout, f"error: rank {rank}: the other ranks did not connect within {timeout:g} s; "
                              f"check the hostfile, that every host runs the same command, and the firewall "
                              f"({CONNECT_TIMEOUT_ENV} sets the wait)\n")
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise RankError(f"rank {rank}: cannot join the other ranks ({' '.join(str(e).split())})") from None
    finally:
        stop()
    if group.size() > 1:
        global _watch
        _watch = _Watchdog(step, f"error: rank {rank}: no progress for {step:g} s: another rank stopped answering "
                                 f"(its host went away or it hangs); stopping ({STEP_TIMEOUT_ENV} sets the wait)\n")
        _quiet(group.rank())  # after the fork: the watchdog writes to the real stderr
    return group


class _Watchdog:
    """A forked process that ends this one (one line, SIGTERM) when it stays armed `timeout` s
    without a pet. Commands over a pipe: a (arm), p (pet), d (disarm); EOF ends it."""

    def __init__(self, timeout: float, message: str):
        read_end, self.pipe = os.pipe()
        parent, self.last = os.getpid(), 0.0
        if os.fork() == 0:
            os.close(self.pipe)
            armed = False
            while True:
                ready, _, _ = select.select([read_end], [], [], timeout if armed else None)
                if not ready:  # armed and silent for `timeout`
                    os.write(2, message.encode())
                    try:
                        _end(parent)
                    finally:
                        os._exit(0)
                data = os.read(read_end, 4096)
                if not data:
                    os._exit(0)
                armed = data[-1:] != b"d"
        os.close(read_end)

    def send(self, command: bytes) -> None:
        os.write(self.pipe, command)

    def pet(self) -> None:
        now = time.monotonic()
        if now - self.last > 1.0:  # at most one write a second
            self.last = now
            self.send(b"p")


def _end(pid: int, grace: float = 3.0) -> None:
    """SIGTERM `pid` (our parent), then SIGKILL if it still runs after `grace` s: a server's
    SIGTERM handler drains its connections, which wait on the rank that stopped answering."""
    try:
        os.kill(pid, 15)
        end = time.monotonic() + grace
        while os.getppid() == pid and time.monotonic() < end:  # reparented once it has exited
            time.sleep(0.1)
        if os.getppid() == pid:
            os.kill(pid, 9)
    except ProcessLookupError:
        pass


_watch: _Watchdog | None = None


def progress() -> None:
    """Collective work is moving (called as each step's graph is built): re-arm the watchdog."""
    if _watch is not None:
        _watch.pet()


@contextmanager
def watch_ranks():
    """Around a generation: the watchdog is armed inside, idle outside (a chat waiting for its
    user is not a hang, nor a rank waiting at load for a slower one)."""
    if _watch is None:
        yield
        return
    _watch.send(b"a")
    try:
        yield
    finally:
        _watch.send(b"d")


def _watchdog(timeout: float, message: str):
    """Fork a process that, unless stopped within `timeout` s, writes `message` to stderr and
    ends this process. Returns stop(). The child only waits on a pipe: no MLX in it."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the watchdog
        os.close(write_end)
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:  # the parent neither finished nor died: it hangs in init
            os.write(2, message.encode())
            try:
                os.kill(parent, 15)
            except ProcessLookupError:
                pass
        os._exit(0)
    os.close(read_end)

    def stop():
        os.close(write_end)  # EOF: the watchdog exits
        os.waitpid(pid, 0)

    return stop


def _quiet(rank: int) -> None:
    """What this rank's output becomes (file descriptors, so C++ output and streams that were
    captured before joining obey too): rank 0 keeps everything but the ring backend's
    '[ring] ...' socket chatter; other ranks drop stdout and keep only the CLI's `error:` lines
    (prefixed with their rank). A thread forwards fd 2 through a pipe; it is drained at exit."""
    real = os.dup(2)
    if rank != 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def keep(line: bytes) -> bytes | None:
        if rank == 0:
            return None if line.startswith(b"[ring]") else line
        if line.startswith(b"error: rank %d: " % rank):  # a RankError names its rank already
            return line
        if line.startswith(b"error: "):
            return b"error: rank %d: " % rank + line[len(b"error: "):]
        if _EXCEPTION_LINE.match(line):  # the last line of a traceback: a bug, say where it happened
            return b"error: rank %d: " % rank + line
        return None

    def forward():
        pending = b""
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if (out := keep(line + b"\n")) is not None:
                    os.write(real, out)
        if pending and (out := keep(pending)) is not None:
            os.write(real, out)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()

    def drain():
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last writer: the thread reads EOF and ends
        thread.join(timeout=5)

    atexit.register(drain)


SMALL_TENSOR_BYTES = 1 << 20  # tensors up to this size are hashed whole (norms, biases, A_log, router bias)
SAMPLES_PER_FILE = 64  # plus this many 4 KiB blocks spread over each file's data


def checkpoint_fingerprint(folder: Path) -> bytes:
    """16 bytes that differ between checkpoints: config.json, each safetensors file's name, size
    and header, every small tensor whole, and 4 KiB blocks spread over the rest (hashing all
    98 GB would take minutes; a fine-tune changes the norms, a different conversion the header)."""
    from ..loading import check_safetensors, safetensors_files

    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in safetensors_files(folder):
        header = check_safetensors(path)
        size = path.stat().st_size
        h.update(json.dumps([path.name, size, header], sort_keys=True).encode())
        with open(path, "rb") as f:
            base = 8 + int.from_bytes(f.read(8), "little")
            ranges = sorted(tuple(m["data_offsets"]) for k, m in header.items() if k != "__metadata__")
            for start, end in ranges:
                if end - start <= SMALL_TENSOR_BYTES:
                    f.seek(base + start)
                    h.update(f.read(end - start))
            for i in range(SAMPLES_PER_FILE):
                f.seek(base + (size - base) * i // SAMPLES_PER_FILE)
                h.update(f.read(4096))
    return h.digest()[:16]


def check_same_checkpoint(group, folder: Path) -> None:
    """Refuse to go on unless every rank's checkpoint has the same fingerprint (RankError on
    every rank, naming the ranks that differ from rank 0)."""
    import mlx.core as mx

    if group.size() == 1:
        return
    mine = mx.array(list(checkpoint_fingerprint(folder)), dtype=mx.int32)  # [16]
    every = mx.distributed.all_gather(mine[None], group=group)  # [N, 16]
    differ = [r for r, row in enumerate(every.tolist()) if row != every[0].tolist()]
    if differ:
        raise RankError(f"rank {group.rank()}: ranks {differ} hold a different checkpoint than rank 0 "
                        f"({folder} here); copy the same model folder to every host")


def broadcast_token(token, group):
    """Rank 0's token on every rank: samplers draw from each rank's own random state, so ranks
    would drift apart at temperature > 0 (and float sums may differ in the last bit)."""
    import mlx.core as mx

    if group is None or group.size() == 1:
        return token
    # token * 0, not zeros: the other ranks' share must depend on their own logits too, or their
    # all_sum could run before the model's collectives of the same graph (rank 0's cannot): the
    # ranks would wait on each other (seen in the server's pipelined decode steps)
    mine = token if group.rank() == 0 else token * 0
    return mx.distributed.all_sum(mine, group=group)


def peer_error(error: BaseException) -> RankError | None:
    """The backend's 'a peer went away' RuntimeError as one RankError line; None for other errors."""
    text = " ".join(str(error).split())
    if isinstance(error, RuntimeError) and ("peer" in text or "connection" in text) and text.startswith("["):
        rank = os.environ.get("MLX_RANK", "?")
        return RankError(f"rank {rank}: lost the connection to another rank ({text}); it stopped or its host "
                         "went away: see that rank's error, then start all ranks again")
    return None
