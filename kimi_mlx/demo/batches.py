"""Training batches for the demo model: fixed shapes, a pure function of (seed, pool index).

Chats are drawn in pools; pool p is the first `pool` chats of data.stream(pool_seed(seed, p),
holdout=True), so any pool can be rebuilt on its own: worker processes build pools ahead of the
training loop, and a resumed run starts at (pool, batch) without replaying the stream.
Each batch is [B, L] with L one of BUCKETS and B = tokens_per_batch // L, so a compiled training
step sees only len(BUCKETS) shapes. Within a pool the chats are sorted by length and cut into
groups that fit the smallest possible bucket; the last group of a pool is filled with empty rows
(loss mask 0). Chats longer than the largest bucket are dropped (counted).
"""

from __future__ import annotations

import multiprocessing
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data

# Padded lengths (tokens). 256 is also the longest training chat: one MLA key block (see
# mla_layer._block_size), so no evaluation happens inside the graph of a training step.
BUCKETS = (32, 64, 128, 256)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that decides the batches (recorded in training.json)."""

    seed: int
    weights: dict
    multi_turn: float
    tokens_per_batch: int
    pool: int = 8192  # chats per pool
    buckets: tuple = BUCKETS


def pool_seed(seed: int, index: int) -> int:
    return (seed << 32) + index


def encode(tokenizer, chat: tuple[data.Example, ...]) -> tuple[list[int], list[bool]]:
    """(ids of the whole chat, which ids are reply tokens to learn). Turns are rendered one at a
    time, as kimi_mlx.chat does; data.chat_text is the checkpoint's template for plain turns
    (tests/test_demo_model.py checks that it tokenizes as apply_chat_template does)."""
    ids, is_reply = [], []
    for example in chat:
        prompt = tokenizer.encode(data.chat_text(example.messages, add_generation_prompt=True), allow_special=True)
        reply = tokenizer.encode(example.answer) + [tokenizer.eos_token_id]
        ids += prompt + reply
        is_reply += [False] * len(prompt) + [True] * len(reply)
    return ids, is_reply


def pool_batches(tokenizer, spec: StreamSpec, index: int) -> tuple[list[tuple[np.ndarray, ...]], int]:
    """The batches of pool `index`: [(inputs [B, L] int32, targets [B, L] int32, mask [B, L] f32)],
    in a seeded shuffled order, and how many chats were dropped as too long.

    Right padding with [PAD]: the model is causal, so padding after a chat never changes it.
    """
    chats = data.stream(pool_seed(spec.seed, index), spec.weights, spec.multi_turn, holdout=True)
    longest = spec.buckets[-1]
    encoded, dropped = [], 0
    for _ in range(spec.pool):
        ids, is_reply = encode(tokenizer, next(chats))
        if len(ids) - 1 > longest:
            dropped += 1
            continue
        encoded.append((ids, is_reply))
    encoded.sort(key=lambda e: len(e[0]))
    out, i = [], 0
    while i < len(encoded):
        for L in spec.buckets:  # the smallest bucket that holds this chat and the next B - 1
            B = spec.tokens_per_batch // L
            last = min(i + B, len(encoded)) - 1
            if len(encoded[last][0]) - 1 <= L:
                break
        group, i = encoded[i:i + B], i + B
        pad = tokenizer.pad_token_id
        inputs = np.full((B, L), pad, np.int32)
        targets = np.full((B, L), pad, np.int32)
        mask = np.zeros((B, L), np.float32)
        for r, (ids, is_reply) in enumerate(group):
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = ids[1:]
            mask[r, :n] = is_reply[1:]  # predict every reply token (and <|im_end|>)
        out.append((inputs, targets, mask))
    random.Random(pool_seed(spec.seed, index)).shuffle(out)
    return out, dropped


_worker: dict = {}


def _init_worker(tokenizer_dir: str, spec: StreamSpec) -> None:
    from ..tokenizer import load_tokenizer

    _worker["tokenizer"], _worker["spec"] = load_tokenizer(tokenizer_dir), spec


def _build(index: int):
    return pool_batches(_worker["tokenizer"], _worker["spec"], index)


class BatchStream:
    """Endless batches from position (pool, batch); `workers` > 0 builds pools ahead in processes.

    next() -> (inputs, targets, mask) as numpy arrays; `position` is where the next batch comes
    from (save it with a checkpoint to resume exactly there).
    """

    def __init__(self, tokenizer, tokenizer_dir: Path, spec: StreamSpec, start: tuple[int, int] = (0, 0),
                 workers: int = 0, ahead: int = 0):
        self.tokenizer, self.spec = tokenizer, spec
        self.pool_index, self.batch_index = start
        self.dropped = 0
        self._batches = None
        self._procs = None
        self._pending: deque = deque()
        if workers > 0:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds a GPU context
            self._procs = ctx.Pool(workers, _init_worker, (str(tokenizer_dir), spec))
            self._next_submit = self.pool_index
            for _ in range(ahead or 2 * workers):
                self._submit()

    def _submit(self) -> None:
        self._pending.append((self._next_submit, self._procs.apply_async(_build, (self._next_submit,))))
        self._next_submit += 1

    def _load_pool(self) -> None:
        if self._procs is None:
            self._batches, dropped = pool_batches(self.tokenizer, self.spec, self.pool_index)
        else:
            index, result = self._pending.popleft()
            assert index == self.pool_index, (index, self.pool_index)
            self._batches, dropped = result.get()
            self._submit()
        self.dropped += dropped

    @property
    def position(self) -> tuple[int, int]:
        return self.pool_index, self.batch_index

    def __next__(self):
        while True:
            if self._batches is None:
                self._load_pool()
            if self.batch_index < len(self._batches):
                batch = self._batches[self.batch_index]
                self.batch_index += 1
                return batch
            self._batches, self.pool_index, self.batch_index = None, self.pool_index + 1, 0

    def close(self) -> None:
        if self._procs is not None:
            self._procs.terminate()
            self._procs = None
