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
folder is bounded in bytes too, and a server started on it takes in the snapshots an earlier
one left there (same model only). Only the engine's model thread calls this.

Under mlx.launch (`group`: the ranks) each rank keeps its own shard of every snapshot, and the
trie must make the same decisions on every rank (a hit decides where a prompt's prefill starts,
which every rank must run alike). The ranks run the same inserts and lookups in the same order
(kimi_mlx/server/lockstep.py); what could differ is a snapshot's size (a pipeline stage holds
other layers than its neighbour), so sizes are agreed on: the largest rank's, so the budget
bounds every rank. Spilling is off under ranks (each rank's files and their sizes would differ).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..prompt_cache import PROMPT_CACHE_FORMAT, model_fingerprint, read_state_file, save_state_file


def cache_nbytes(cache: list) -> int:
    """Bytes a snapshot holds: a latent cache's allocated rows (its last page may be up to twice
    the tokens it holds: LatentCache.nbytes), a KDA cache's windows and state. Arrays shared with
    other snapshots are counted in each, so the bound is conservative."""
    return sum(c.nbytes if hasattr(c, "nbytes") else sum(a.nbytes for a in c.state) for c in cache)


class _Node:
    """A radix-trie node: `edge` holds the tokens from its parent to it (int32, 4 bytes a token,
    so a long conversation costs its token count, not a Python object per token)."""

    __slots__ = ("children", "parent", "edge", "depth", "snapshot", "spilled")

    def __init__(self, parent: "_Node | None", edge: np.ndarray, depth: int):
        self.children: dict[int, _Node] = {}  # by the first token of the child's edge
        self.parent, self.edge, self.depth = parent, edge, depth  # depth: tokens from the root to here
        self.snapshot: list | None = None  # layer caches, B = 1
        self.spilled: tuple[Path, int] | None = None  # (file, bytes) once written to the spill folder


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class StateCache:
    """Snapshots by token prefix; `max_bytes` in memory, `spill_bytes` in `spill_dir` (optional)."""

    def __init__(self, max_bytes: int, spill_dir: str | os.PathLike | None = None, spill_bytes: int = 0,
                 model=None, model_name: str = "this model", group=None):
        self.max_bytes, self.spill_bytes = max_bytes, spill_bytes
        self.group = group if group is not None and group.size() > 1 else None
        if self.group is not None and spill_dir is not None:
            raise ValueError("a state cache shared by ranks does not spill")
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.model_name = model, model_name
        self.root = _Node(None, np.zeros(0, np.int32), 0)
        self.lru: OrderedDict[int, tuple[_Node, int]] = OrderedDict()  # id(node) -> (node, bytes)
        self.spill_lru: OrderedDict[int, _Node] = OrderedDict()
        self.nbytes = self.spilled_nbytes = 0
        self.hits = self.misses = 0
        self._names = itertools.count()
        if self.spill_dir is not None and model is not None:
            self._index_spilled()

    def __len__(self) -> int:
        return len(self.lru)

    # ---- writing

    def insert(self, tokens: list[int], cache: list) -> None:
        """Keep a snapshot of `cache` (which has consumed exactly `tokens`)."""
        if not tokens or self.max_bytes <= 0:
            return
        node = self._node_at(np.asarray(tokens, dtype=np.int32))
        if node.snapshot is not None:
            self.lru.move_to_end(id(node))
            return
        snap = [c.copy() for c in cache]
        size = self._size(snap)
        if size > self.max_bytes:
            self._prune(node)
            return
        node.snapshot = snap
        self.lru[id(node)] = (node, size)
        self.nbytes += size
        self._evict()

    def _size(self, snap: list) -> int:
        """A snapshot's bytes; under ranks the largest rank's (one all_gather, in KiB: int32)."""
        size = cache_nbytes(snap)
        if self.group is None:
            return size
        import mlx.core as mx

        every = mx.distributed.all_gather(mx.array([-(-size // 1024)], dtype=mx.int32), group=self.group)
        return int(every.max().item()) * 1024

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

    def _index_spilled(self) -> None:
        """Take in the snapshots an earlier server spilled here for this model (oldest first in
        the LRU), reading only their token ids: a restarted server keeps its conversations.
        Files of other models or other formats are left alone."""
        from safetensors import safe_open

        fingerprint = model_fingerprint(self.model)
        for path in sorted(self.spill_dir.glob("state-*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                with safe_open(str(path), framework="numpy") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != PROMPT_CACHE_FORMAT or meta.get("model") != fingerprint:
                        continue
                    tokens = f.get_tensor("tokens").astype(np.int32)
            except Exception:  # noqa: BLE001 - an unreadable file is skipped, not fatal
                continue
            if len(tokens) == 0:
                continue
            node = self._node_at(tokens)
            if node.spilled is not None:
                continue
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

    def _node_at(self, tokens: np.ndarray) -> _Node:
        """The node ending exactly at `tokens`, made (splitting an edge) if needed."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(int(tokens[i]))
            if child is None:
                new = _Node(node, tokens[i:].copy(), len(tokens))
                node.children[int(tokens[i])] = new
                return new
            n = _common(child.edge, tokens[i:])
            if n < len(child.edge):  # split the edge: a node for the shared part
                mid = _Node(node, child.edge[:n].copy(), node.depth + n)
                node.children[int(tokens[i])] = mid
                child.edge, child.parent = child.edge[n:].copy(), mid
                mid.children[int(child.edge[0])] = child
                child = mid
            node, i = child, i + n
        return node

    def _prune(self, node: _Node) -> None:
        """Remove nodes that hold nothing and lead to nothing; merge a bare node into its only child."""
        while node is not self.root and node.snapshot is None and node.spilled is None and len(node.children) <= 1:
            parent = node.parent
            key = int(node.edge[0])
            if node.children:
                (child,) = node.children.values()
                child.edge, child.parent = np.concatenate([node.edge, child.edge]), parent
                parent.children[key] = child
                return
            del parent.children[key]
            node = parent

    @staticmethod
    def _tokens(node: _Node) -> list[int]:
        edges = []
        while node.parent is not None:
            edges.append(node.edge)
            node = node.parent
        return np.concatenate(edges[::-1]).tolist() if edges else []

    # ---- reading

    def lookup(self, tokens: list[int]) -> tuple[int, list | None]:
        """The longest snapshot whose ids are a proper prefix of `tokens` (at least one token is
        left to prefill, for the logits): (its length, copies of its caches) or (0, None)."""
        node, best, i = self.root, None, 0
        prefix = np.asarray(tokens[:-1], dtype=np.int32)
        while i < len(prefix):
            child = node.children.get(int(prefix[i]))
            if child is None or _common(child.edge, prefix[i:]) < len(child.edge):
                break
            node, i = child, i + len(child.edge)
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
        self.root, self.nbytes = _Node(None, np.zeros(0, np.int32), 0), 0
