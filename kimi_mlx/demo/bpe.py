"""A small byte-level BPE vocabulary trained on the demo corpus, written in Kimi's real format.

Layout as the released tokenizer: ranks 0..255 are the single bytes, then merges in the order
learned (tiktoken's rule: the pair whose merged bytes have the lowest rank merges first, so
training order = rank order gives the same encoding). Text is first split with Kimi's own
pre-tokenizer pattern. Digits are never merged, so every digit is its own token (arithmetic
and codes stay learnable). The 256 ids after the ranks are Kimi's special tokens, at the same
offsets as in Kimi-Linear (there n = 163584: [BOS] 163584, <|im_end|> 163586, [PAD] 163839).
"""

from __future__ import annotations

import collections
from pathlib import Path

import regex

from ..tokenizer import DEFAULT_CHAT_TEMPLATE, PAT_STR, load_tokenizer, write_tokenizer_files

# Offsets from the first special id, as in Kimi-Linear's tokenizer_config.json.
SPECIAL_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "[UNK]": 254,
    "[PAD]": 255,
}
NOT_SPECIAL = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>")
_SPECIAL_SPLIT = regex.compile("|".join(regex.escape(s) for s in SPECIAL_OFFSETS))
_DIGIT = set(b"0123456789")


def pretokenize(texts) -> collections.Counter:
    """Counts of the pre-token byte strings (special tokens removed, Kimi's split pattern)."""
    pat = regex.compile(PAT_STR, flags=regex.V1)  # V1: the `&&` class intersections, as tiktoken reads them
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for part in _SPECIAL_SPLIT.split(text):
            counts.update(m.encode("utf-8") for m in pat.findall(part))
    return counts


def train_bpe(texts, num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE: {token bytes: rank} with exactly `num_ranks` entries (256 bytes + merges)."""
    counts = pretokenize(texts)
    words = [[bytes([b]) for b in w] for w in counts]
    freqs = list(counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < num_ranks:
        pairs: collections.Counter = collections.Counter()
        for w, f in zip(words, freqs):
            for a, b in zip(w, w[1:]):
                if not (_DIGIT & set(a + b)):
                    pairs[a, b] += f
        if not pairs:
            raise ValueError(f"corpus too small: only {len(ranks)} tokens can be learned")
        # Most frequent pair; ties broken by the bytes, so training is deterministic.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        if merged not in ranks:
            ranks[merged] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [merged]
                i += 1
    return ranks


def special_tokens(num_ranks: int) -> dict[str, int]:
    return {s: num_ranks + off for s, off in SPECIAL_OFFSETS.items()}


def write_tokenizer(folder: str | Path, ranks: dict[bytes, int]) -> None:
    """tiktoken.model + tokenizer_config.json (chat template inside it, as the brief for the demo asks)."""
    import json

    folder = Path(folder)
    write_tokenizer_files(folder, ranks, special_tokens(len(ranks)), chat_template=None,
                          bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
                          not_special=NOT_SPECIAL, model_max_length=1_048_576)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build_tokenizer(folder: str | Path, texts, num_ranks: int):
    """Train, write, and load back (the loaded tokenizer is what training uses)."""
    write_tokenizer(folder, train_bpe(texts, num_ranks))
    return load_tokenizer(folder)
