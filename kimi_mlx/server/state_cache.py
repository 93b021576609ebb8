"""Multi-turn state cache: snapshots of the whole model state in a trie keyed by token prefix.

KDA states cannot be trimmed back to an earlier position, so a cache hit must be a snapshot
taken exactly at a prefix of the new prompt. The engine snapshots at message boundaries (end
of the system prompt, of each user turn, of each reply: what the conversation's next request
starts with) and a request continues from the longest snapshot that prefixes its prompt, so
it prefills only its new tokens. Snapshots are `cache.copy()` lists (B = 1): they share arrays
with the request's cache, which are never written in place.

Memory is bounded in bytes (least recently used snapshots go first). With a spill folder an
evicted snapshot is written there in the prompt-cache format (kimi_mlx/prompt_cache.py: raw
form, loadable by `kimi-mlx generate --raw --prompt-cache FILE`) and read back on a hit; the
folder is bounded in bytes too. Only the engine's model thread calls this.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

from ..prompt_cache import PROMPT_CACHE_FORMAT, read_state_file, save_state_file


def cache_nbytes(cache: list) -> int:
    """Bytes a snapshot holds: a latent cache's allocated rows (its last page may be up to twice
    the tokens it holds: LatentCache.nbytes), a KDA cache's windows and state. Arrays shared with
    other snapshots are counted in each, so the bound is conservative."""
    return sum(c.nbytes if hasattr(c, "nbytes") else sum(a.nbytes for a in c.state) for c in cache)


class _Node:
    __slots__ = ("children", "parent", "token", "depth", "snapshot", "spilled")

    def __init__(self, parent: "_Node | None", token: int | None, depth: int):
        self.children: dict[int, _Node] = {}
        self.parent, self.token, self.depth = parent, token, depth
        self.snapshot: list | None = None  # layer caches, B = 1
        self.spilled: tuple[Path, int] | None = None  # (file, bytes) once written to the spill folder


class StateCache:
    """Snapshots by token prefix; `max_bytes` in memory, `spill_bytes` in `spill_dir` (optional)."""

    def __init__(self, max_bytes: int, spill_dir: str | os.PathLike | None = None, spill_bytes: int = 0,
                 model=None, model_name: str = "this model"):
        self.max_bytes, self.spill_bytes = max_bytes, spill_bytes
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.model_name = model, model_name
        self.root = _Node(None, None, 0)
        self.lru: OrderedDict[int, tuple[_Node, int]] = OrderedDict()  # id(node) -> (node, bytes)
        self.spill_lru: OrderedDict[int, _Node] = OrderedDict()
        self.nbytes = self.spilled_nbytes = 0
        self.hits = self.misses = 0
        self._names = itertools.count()

    def __len__(self) -> int:
        return len(self.lru)

    # ---- writing

    def insert(self, tokens: list[int], cache: list) -> None:
        """Keep a snapshot of `cache` (which has consumed exactly `tokens`)."""
        if not tokens or self.max_bytes <= 0:
            return
        node = self.root
        for t in tokens:
            nxt = node.children.get(t)
            if nxt is None:
                nxt = node.children[t] = _Node(node, t, node.depth + 1)
            node = nxt
        if node.snapshot is not None:
            self.lru.move_to_end(id(node))
            return
        snap = [c.copy() for c in cache]
        size = cache_nbytes(snap)
        if size > self.max_bytes:
            return
        node.snapshot = snap
        self.lru[id(node)] = (node, size)
        self.nbytes += size
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.lru:
            _, (node, size) = self.lru.popitem(last=False)
            if self.spill_dir is not None and node.spilled is None and size <= self.spill_bytes:
                self._spill(node)
            node.snapshot = None
            self.nbytes -= size
            self._prune(node)

    def _spill(self, node: _Node) -> None:
        path = self.spill_dir / f"state-{os.getpid()}-{next(self._names)}.safetensors"
        save_state_file(path, self.model, self._tokens(node), node.snapshot, PROMPT_CACHE_FORMAT, self.model_name,
                        {"text": "", "system": "null", "raw": "true"})
        size = path.stat().st_size
        node.spilled = (path, size)
        self.spill_lru[id(node)] = node
        self.spilled_nbytes += size
        while self.spilled_nbytes > self.spill_bytes and self.spill_lru:
            _, old = self.spill_lru.popitem(last=False)
            self._drop_spilled(old)
            self._prune(old)

    def _drop_spilled(self, node: _Node) -> None:
        path, size = node.spilled
        path.unlink(missing_ok=True)
        node.spilled = None
        self.spilled_nbytes -= size

    def _prune(self, node: _Node) -> None:
        """Remove nodes that hold nothing and lead to nothing."""
        while node is not self.root and node.snapshot is None and node.spilled is None and not node.children:
            parent = node.parent
            del parent.children[node.token]
            node = parent

    @staticmethod
    def _tokens(node: _Node) -> list[int]:
        out = []
        while node.parent is not None:
            out.append(node.token)
            node = node.parent
        return out[::-1]

    # ---- reading

    def lookup(self, tokens: list[int]) -> tuple[int, list | None]:
        """The longest snapshot whose ids are a proper prefix of `tokens` (at least one token is
        left to prefill, for the logits): (its length, copies of its caches) or (0, None)."""
        node, best = self.root, None
        for t in tokens[:-1]:
            node = node.children.get(t)
            if node is None:
                break
            if node.snapshot is not None or node.spilled is not None:
                best = node
        if best is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        if best.snapshot is None:  # spilled: read it back into memory
            path, _ = best.spilled
            _, snap, _ = read_state_file(path, self.model, PROMPT_CACHE_FORMAT, self.model_name,
                                         "kimi-mlx prompt cache", "written by kimi-mlx serve")
            del self.spill_lru[id(best)]
            self._drop_spilled(best)
            best.snapshot = snap
            size = cache_nbytes(snap)
            self.lru[id(best)] = (best, size)
            self.nbytes += size
            self._evict()
            if best.snapshot is None:  # evicted at once: larger than the memory budget
                return 0, None
        else:
            self.lru.move_to_end(id(best))
        return best.depth, [c.copy() for c in best.snapshot]

    def clear(self) -> None:
        for node, _ in list(self.lru.values()):
            node.snapshot = None
        for node in list(self.spill_lru.values()):
            self._drop_spilled(node)
        self.lru.clear()
        self.spill_lru.clear()
        self.root, self.nbytes = _Node(None, None, 0), 0
