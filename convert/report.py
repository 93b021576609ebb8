"""Quality of a conversion: the converted model against its source, on the same tokens.

Over N tokens of one sequence (default 256):
- top-1 agreement: how often both models rank the same next token first;
- KL(source || converted) of the next-token distributions, in nats: mean and max over positions.
Models are loaded one at a time (only the source's log-probabilities, N x vocab floats, are
kept), so peak memory is that of the larger model, not of both. Tokens come from the source's
tokenizer on a fixed text when it has one, else fixed random ids (the tiny test checkpoints).

    python -m kimi_mlx.convert.report SRC DST [DST ...]     # one line per converted folder (recipe)
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from kimi_mlx.loading import load_model, resolve_model_path

TEXT = (
    "The Kimi Delta Attention layer keeps a fixed-size state per head and updates it with a gated "
    "delta rule, so memory does not grow with the context. Every few layers a latent attention layer "
    "looks back over all tokens. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\nIn 1969 the first crewed lunar landing took place; "
    "the crew spent about 21 hours on the surface. 长文本理解需要模型在很长的上下文中保持信息。"
    "A mixture of experts routes each token to a few of many feed-forward networks, which keeps the "
    "compute per token small while the total number of parameters is large. "
)


@dataclass
class ReportRow:
    dst: str
    label: str
    tokens: int
    top1: float
    kl_mean: float
    kl_max: float

    def __str__(self) -> str:
        return (f"{self.label}: top-1 agreement {self.top1:.1%}, KL mean {self.kl_mean:.4f} nats, "
                f"max {self.kl_max:.3f} ({self.tokens} tokens) [{self.dst}]")


def compare_models(src: str | Path, dsts: list[str | Path], n_tokens: int = 256, seed: int = 0) -> list[ReportRow]:
    """Each converted folder in `dsts` against the source checkpoint `src` (folder or hub id)."""
    folder = resolve_model_path(src)
    ref_model = load_model(folder)
    ids = report_tokens(folder, n_tokens, ref_model.args.vocab_size, seed)
    ref = _log_probs(ref_model, ids)
    del ref_model
    gc.collect()
    p_ref = np.exp(ref)
    rows = []
    for dst in dsts:
        model = load_model(dst)
        got = _log_probs(model, ids)
        del model
        gc.collect()
        kl = (p_ref * (ref - got)).sum(-1)  # [T]
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        rows.append(ReportRow(str(dst), describe_quantization(Path(dst) / "config.json"), len(ids), top1,
                              float(kl.mean()), float(kl.max())))
    return rows


def report_tokens(folder: Path, n_tokens: int, vocab: int, seed: int = 0) -> list[int]:
    if (folder / "tiktoken.model").exists() and (folder / "tokenizer_config.json").exists():
        from kimi_mlx.tokenizer import load_tokenizer

        ids = load_tokenizer(folder).encode(TEXT)
        while len(ids) < n_tokens:
            ids = ids + ids
        return ids[:n_tokens]
    return np.random.default_rng(seed).integers(0, vocab, size=n_tokens).tolist()


def _log_probs(model, ids: list[int]) -> np.ndarray:
    logits = model(mx.array([ids], dtype=mx.int32))[0].astype(mx.float32)  # [T, V]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def describe_quantization(config_path: Path) -> str:
    """A recipe label from config.json's quantization block (mlx-lm's form)."""
    from kimi_mlx.config import read_config

    config = read_config(config_path)
    q = config.get("quantization")
    if not q:
        return f"not quantized ({config.get('dtype', config.get('torch_dtype', '?'))})"
    overrides = {k: v for k, v in q.items() if isinstance(v, dict) and not k.endswith("mlp.gate")}
    recipe = f"mixed ({len(overrides)} modules at other bits)" if overrides else "uniform"
    return f"{q['bits']}-bit {q.get('mode', 'affine')} g{q['group_size']}, {recipe}"


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m kimi_mlx.convert.report SRC DST [DST ...]")
    for row in compare_models(sys.argv[1], sys.argv[2:]):
        print(row)
