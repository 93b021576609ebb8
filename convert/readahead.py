"""Read the source ahead of the converter, in a thread, so disk reads overlap the compute.

The thread reads each tensor's byte range (in the order the groups will take them) into a small
scratch buffer and throws it away: the point is only that the OS page cache holds the bytes when
MLX loads them. It stays at most `ahead` bytes in front of the converter, so it never evicts
what is about to be used. Nothing here can change the output; any error just stops the thread.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

BLOCK = 16 << 20


class Readahead:
    def __init__(self, ranges: list[tuple[Path, int, int]], ahead: int = 1 << 30):
        self.ranges, self.ahead = ranges, ahead
        self.consumed = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="convert-readahead", daemon=True)
        self.thread.start()

    def advance(self, nbytes: int) -> None:
        """The converter has used nbytes more of the source."""
        with self.cond:
            self.consumed += nbytes
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        issued, fds, buf = 0, {}, bytearray(BLOCK)
        try:
            for path, offset, length in self.ranges:
                fd = fds.get(path) or fds.setdefault(path, os.open(path, os.O_RDONLY))
                end = offset + length
                while offset < end:
                    with self.cond:
                        while not self.stopped and issued - self.consumed > self.ahead:
                            self.cond.wait()
                        if self.stopped:
                            return
                    n = os.preadv(fd, [memoryview(buf)[: min(BLOCK, end - offset)]], offset)
                    if n <= 0:
                        return
                    offset += n
                    issued += n
        except OSError:
            return
        finally:
            for fd in fds.values():
                os.close(fd)
