"""Kimi-Linear: a hybrid of KDA layers (constant-size state) and MLA layers (latent cache).

Contract (other modules and tools rely on it):
    model = Model(ModelArgs)
    logits = model(inputs [B, T] int, cache=None, mask=None, last_only=False)  # [B, T|1, vocab]
    cache = model.make_cache()  # one KDACache / LatentCache per layer, carried across calls
`mask` [B, T] marks real tokens (1) against LEFT padding (0) for batches of unequal prompts.
Parameter paths follow mlx-lm's `kimi_linear`, so weights converted by either tool load in both.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KDACache, LatentCache, make_cache
from .config import ModelArgs
from .dtypes import FP32_PARAMS  # noqa: F401 (imported from here by others)
from .decode import DecodeStep, decode_layer
from .kda_layer import KimiDeltaAttention
from .mla_layer import MLAttention
from .moe import MLP, SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.is_kda = args.is_kda_layer(index)
        self.self_attn = KimiDeltaAttention(args) if self.is_kda else MLAttention(args)
        self.mlp = SparseMoE(args) if args.is_moe_layer(index) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, cache, step: DecodeStep | None = None) -> mx.array:
        if x.shape[1] == 1 and mask is None and cache is not None:
            h = decode_layer(self, x, cache, step)  # a compiled step (kimi_mlx/decode.py), or None
            if h is not None:
                return h
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class KimiLinearModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, mask: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(inputs)  # [B, T, hidden]
        step = DecodeStep(h) if inputs.shape[1] == 1 and mask is None and cache is not None else None
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache, step)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = KimiLinearModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, mask: mx.array | None = None, last_only: bool = False):
        """inputs [B, T] int -> logits [B, T, vocab], or [B, 1, vocab] with last_only."""
        h = self.model(inputs, cache, mask)
        if last_only:
            h = h[:, -1:]  # generation needs one row: skip the lm_head over the whole prompt
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self, kv_bits: int | None = None) -> list[KDACache | LatentCache]:
        """One cache per layer; MLA latents kept at kv_bits (None/16 = activation dtype, 8 or 4)."""
        return make_cache(self, kv_bits)
