"""Memory plan: do the model and a context of N tokens fit this machine? (`kimi-mlx plan`)

Counted exactly, from config.json alone (no weights needed, so a user can plan before downloading):
- weights: every parameter of kimi_mlx.model.Model (`parameter_shapes`; tests match it against an
  instantiated model) at the bytes the runtime holds on the backend planned for (kimi_mlx.dtypes:
  the loader's own rule; on the CPU backend the routed experts' float tensors are float32).
  Quantization follows config.json's `quantization` block as mlx-lm does: a Linear, Embedding,
  SwitchLinear or MultiLinear weight is quantized when its module path has its own entry (a spec,
  or false) or else when its last dim is a multiple of the group size: bits/8 per weight plus, per
  group, a scale and a bias in a float dtype (affine) or one 1-byte scale (mxfp4, mxfp8, nvfp4).
  Float tensors are in the checkpoint dtype (config `dtype` / `torch_dtype`, else bfloat16),
  except FP32_PARAMS (A_log, dt_bias, the router bias) in float32. When the folder holds the
  weights, their safetensors headers are counted instead (each tensor's own dtype: exact for a
  checkpoint of mixed dtypes too); with a loaded model at hand (generate, chat), its parameters.
- KDA states: per KDA layer the fp32 recurrent state [B, H, Dv, Dk] and three conv windows
  [B, K-1, H*D] in the activation dtype (the layouts of kimi_mlx/cache.py).
- latent cache: per MLA layer the rows LatentCache allocates for the context (sealed pages, plus a
  tail grown by doubling) x the bytes of one 576-wide row at kv_bits 16, 8 or 4.
Estimated from per-layer measurements (see `activation_bytes`): the activations of one prefill
step of `prefill_step` tokens. MLX's buffer cache, the OS and other programs are
not counted, so a plan fits only when its total is at most MARGIN of the memory available.
Sizes print in GiB (2^30 bytes; a "128 GB" Mac has 128 GiB, and --memory-gb counts the same way).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx

from .cache import KV_GROUP_SIZE, LatentCache
from .config import ModelArgs, read_config
from .dtypes import FLOAT_BYTES, FP32_PARAMS, dtype_name, experts_fp32, held_float_dtype
from .errors import KimiError, ModelFormatError
from .files import expand_user
from .kda.chunked import CHUNK as KDA_CHUNK  # the chunked KDA prefill's chunk
from .loading import check_safetensors, demo_model_path, resolve_model_path, safetensors_files
from .mla_layer import ABSORB_MAX_QUERIES, _block_size

MAX_CONTEXT = 1048576  # the released model's model_max_length (ModelArgs' default when config.json lacks it)
DEFAULT_PREFILL_STEP = 512  # = kimi_mlx.generate.DEFAULT_PREFILL_STEP (not imported: generate may import us)
MARGIN = 0.9  # a plan fits when its total is at most this share of the memory available
DTYPE_BYTES = FLOAT_BYTES
BACKENDS = ("cpu", "gpu")


class ContextTooLong(KimiError):
    """A context past the model's model_max_length."""


class ContextDoesNotFit(KimiError):
    """The plan for this context needs more memory than the machine has; the message holds the plan."""


@dataclass
class MemoryPlan:
    context: int
    kv_bits: int
    prefill_step: int
    batch: int
    parameters: int
    weights: int  # bytes, as are the next four
    kda_states: int
    latent_cache: int
    activations: int
    available: int
    memory_source: str  # where `available` comes from
    weights_by_format: dict  # e.g. {"4-bit affine g64": bytes, "bfloat16": bytes}
    on_disk: tuple[int, int] | None = None  # (bytes, files) of the folder's safetensors, a cross-check
    backend: str = "gpu"  # the backend planned for: "cpu" or "gpu"
    weights_source: str = "config.json"  # what the weights were counted from
    ranks: int = 1  # > 1: the plan of one rank (the fullest) of a model split by kimi_mlx.parallel
    parallel: str = "tensor"  # how it is split: tensor | pipeline
    rank: int = 0  # which rank this plan is of

    @property
    def total(self) -> int:
        return self.weights + self.kda_states + self.latent_cache + self.activations

    @property
    def usable(self) -> int:
        return int(self.available * MARGIN)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def verdict(self) -> str:
        need, usable = f"{self.total / 2**30:.2f} GiB", f"{self.usable / 2**30:.2f} GiB"
        if self.fits:
            return f"fits: {need} of {usable} usable ({self.total / self.usable:.0%})"
        if self.weights > self.usable:
            hint = "the weights alone exceed it: use a (more strongly) quantized model"
        else:
            hint = "shorten the context" + (", or keep the latent cache at 8 or 4 bits" if self.kv_bits > 4 else "")
        return f"does not fit: {self.context:,} tokens need {need}, {usable} usable; {hint}"

    def format(self) -> str:
        (main, main_bytes), *rest = self.weights_by_format.items()  # the largest first
        parts = f"{main} {main_bytes / 2**30:.2f} GiB" + (
            f"; {', '.join(k for k, _ in rest)} {sum(v for _, v in rest) / 2**30:.2f} GiB" if rest else "")
        lines = [
            f"memory plan: {self.context:,} tokens, batch {self.batch}, latent cache {self.kv_bits}-bit, "
            f"prefill steps of {self.prefill_step} (GiB = 2^30 bytes)",
            f"  weights       {_gib(self.weights)}  {self.parameters / 1e9:.2f}B parameters: {parts}",
            f"                held on the {self.backend.upper()} backend, counted from {self.weights_source}"
            + ("; routed experts in float32 there" if self.backend == "cpu" else ""),
            f"  KDA states    {_gib(self.kda_states)}  fp32 recurrent state + conv windows",
            f"  latent cache  {_gib(self.latent_cache)}  MLA latents, {self.kv_bits}-bit",
            f"  activations   {_gib(self.activations)}  one prefill step (estimate)",
            f"  total         {_gib(self.total)}",
            f"  available     {_gib(self.available)}  {self.memory_source}; plans use at most {MARGIN:.0%}",
        ]
        if self.ranks > 1:
            lines.insert(1, f"  per rank      rank {self.rank} of {self.ranks}, {self.parallel} parallel (the fullest rank); "
                         + ("the latent cache is whole on every rank (shared by the heads)" if self.parallel == "tensor"
                            else "its layers, their states and caches; embedding and lm_head on every rank"))
        if self.on_disk:
            lines.append(f"  on disk       {_gib(self.on_disk[0])}  in {self.on_disk[1]} safetensors files (cross-check)")
        return "\n".join(lines + [self.verdict()])


def _gib(n: int) -> str:
    return f"{n / 2**30:7.2f} GiB"


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every parameter of Model(args): path -> (shape, True for a quantizable module's weight)."""
    h, out = args.hidden_size, {}

    def lin(path, *shape):  # the weight of a Linear, Embedding, SwitchLinear or MultiLinear
        out[f"{path}.weight"] = (shape, True)

    def vec(path, *shape):
        out[path] = (shape, False)

    def mlp(path, inter):
        lin(f"{path}.gate_proj", inter, h), lin(f"{path}.up_proj", inter, h), lin(f"{path}.down_proj", h, inter)

    lin("model.embed_tokens", args.vocab_size, h)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        if args.is_kda_layer(i):
            H, D = args.kda_heads, args.kda_head_dim
            for x in "qkv":
                lin(f"{a}.{x}_proj", H * D, h)
                vec(f"{a}.{x}_conv.conv.weight", H * D, args.conv_kernel, 1)
            lin(f"{a}.f_a_proj", D, h), lin(f"{a}.f_b_proj", H * D, D), lin(f"{a}.b_proj", H, h)
            lin(f"{a}.g_a_proj", D, h), lin(f"{a}.g_b_proj", H * D, D), lin(f"{a}.o_proj", h, H * D)
            vec(f"{a}.A_log", 1, 1, H, 1), vec(f"{a}.dt_bias", H * D), vec(f"{a}.o_norm.weight", D)
        else:
            H, R, Dn, Dr, Dv = (args.num_attention_heads, args.kv_lora_rank, args.qk_nope_head_dim,
                                args.qk_rope_head_dim, args.v_head_dim)
            lin(f"{a}.q_proj", H * (Dn + Dr), h), lin(f"{a}.kv_a_proj_with_mqa", R + Dr, h)
            vec(f"{a}.kv_a_layernorm.weight", R)
            lin(f"{a}.embed_q", H, R, Dn), lin(f"{a}.unembed_out", H, Dv, R)  # kv_b_proj, split per head
            lin(f"{a}.o_proj", h, H * Dv)
        if args.is_moe_layer(i):
            E, inter = args.num_experts, args.moe_intermediate_size
            lin(f"{p}.mlp.gate", E, h), vec(f"{p}.mlp.e_score_correction_bias", E)
            lin(f"{p}.mlp.switch_mlp.gate_proj", E, inter, h), lin(f"{p}.mlp.switch_mlp.up_proj", E, inter, h)
            lin(f"{p}.mlp.switch_mlp.down_proj", E, h, inter)
            if args.num_shared_experts:
                mlp(f"{p}.mlp.shared_experts", inter * args.num_shared_experts)
        else:
            mlp(f"{p}.mlp", args.intermediate_size)
        vec(f"{p}.input_layernorm.weight", h), vec(f"{p}.post_attention_layernorm.weight", h)
    vec("model.norm.weight", h)
    if not args.tie_word_embeddings:
        lin("lm_head", args.vocab_size, h)
    return out


def quant_spec(module: str, in_dim: int, quantization: dict | None) -> dict | None:
    """The quantization of one quantizable module (path without `.weight`), or None: mlx-lm's rule."""
    q = quantization or {}
    if module in q:  # per-module entry: a spec, or false for "kept in the checkpoint dtype"
        return q[module] or None
    if "bits" not in q or in_dim % q.get("group_size", 64):
        return None
    return q


def weight_bytes(args: ModelArgs, dtype: str = "bfloat16", cpu: bool | None = None,
                 share=None) -> tuple[int, int, dict]:
    """-> (parameters, bytes, bytes per storage format) of Model(args) as the runtime holds it, for a
    checkpoint whose float tensors are `dtype`, on the CPU backend (cpu=True), another backend
    (False) or this machine's default device (None). share(name) -> the fraction of each parameter
    held (one rank of a split model; kimi_mlx.parallel.share)."""
    n_params, by_format = 0, Counter()
    for path, (shape, quantizable) in parameter_shapes(args).items():
        n = int(prod(shape) * (share(path) if share else 1))
        n_params += n
        spec = quant_spec(path.removesuffix(".weight"), shape[-1], args.quantization) if quantizable else None
        if spec is None:
            held = held_float_dtype(path, dtype, cpu=cpu)
            by_format[held] += FLOAT_BYTES[held] * n
        else:
            bits, group, mode = spec["bits"], spec.get("group_size", 64), spec.get("mode", "affine")
            scales = held_float_dtype(f"{path.removesuffix('.weight')}.scales", dtype, cpu=cpu)
            per_group = 2 * FLOAT_BYTES[scales] if mode == "affine" else 1  # float scale + bias, or a uint8 scale
            by_format[f"{bits}-bit {mode} g{group}"] += n * bits // 8 + n // group * per_group
    return n_params, sum(by_format.values()), dict(by_format.most_common())


# safetensors dtypes the loader keeps as MLX arrays (others are refused when loading).
_ST_MX = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8,
          "I8": mx.int8, "I32": mx.int32, "U16": mx.uint16, "I16": mx.int16, "BOOL": mx.bool_}


def header_weight_bytes(folder: Path, args: ModelArgs, cpu: bool | None = None, share=None) -> tuple[int, dict, str]:
    """-> (bytes, bytes per storage format, activation dtype) of the weights in `folder` as the
    runtime would hold them, from the safetensors headers alone: each tensor, renamed to the MLX
    layout as loading does (on lazy placeholders, never allocated), at the dtype the loader gives it.
    The activation dtype is the embedding's (or its quantization scales'). share: as weight_bytes."""
    from .weights import to_mlx_layout

    placeholders = {}
    for path in safetensors_files(folder):
        for name, meta in check_safetensors(path).items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _ST_MX:
                raise ModelFormatError(f"{path}: tensor {name} has dtype {meta['dtype']}, which kimi-mlx cannot hold")
            placeholders[name] = mx.zeros(meta["shape"], _ST_MX[meta["dtype"]])
    laid_out = to_mlx_layout(placeholders, args)
    q = args.quantization or {}
    by_format = Counter()
    for name, a in laid_out.items():
        module = name.rsplit(".", 1)[0]
        if f"{module}.scales" in laid_out:
            spec = q.get(module) if isinstance(q.get(module), dict) else q
            label = f"{spec.get('bits', 4)}-bit {spec.get('mode', 'affine')} g{spec.get('group_size', 64)}"
        else:
            label = None
        part = share(name) if share else 1
        if mx.issubdtype(a.dtype, mx.floating):
            held = held_float_dtype(name, dtype_name(a.dtype), cpu=cpu)
            by_format[label or held] += int(a.size * FLOAT_BYTES[held] * part)
        else:
            by_format[label or dtype_name(a.dtype)] += int(a.nbytes * part)
    embed = laid_out.get("model.embed_tokens.scales", laid_out.get("model.embed_tokens.weight"))
    act = dtype_name(embed.dtype) if embed is not None and dtype_name(embed.dtype) in FLOAT_BYTES else "bfloat16"
    return sum(by_format.values()), dict(by_format.most_common()), act


def loaded_weight_bytes(model) -> tuple[int, dict]:
    """-> (bytes, bytes per dtype) of a loaded model's parameters: what it holds, measured."""
    from mlx.utils import tree_flatten

    by_dtype = Counter()
    for _, p in tree_flatten(model.parameters()):
        by_dtype[dtype_name(p.dtype)] += p.nbytes
    return sum(by_dtype.values()), dict(by_dtype.most_common())


def _backend_is_cpu(backend: str | None) -> bool | None:
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise KimiError(f"--backend {backend}: expected cpu or gpu")
    return backend == "cpu"


def latent_rows(tokens: int, append: int) -> int:
    """Rows LatentCache allocates for `tokens` arriving in appends of `append` tokens (then singly).

    Its rule (cache.py): full pages of page_size rows; the last page starts at ceil(first append /
    step) * step rows and doubles when full, up to page_size. Exact when `append` divides page_size
    (the prefill default does); otherwise the first allocation of a later page may differ a little.
    """
    page, step = LatentCache.page_size, LatentCache.step
    full, tail = divmod(tokens, page)
    capacity = -(-min(append, tail) // step) * step
    while capacity < tail:
        capacity *= 2
    return full * page + min(capacity, page)


def latent_row_bytes(args: ModelArgs, kv_bits: int, act_bytes: int) -> int:
    """Bytes of one token's latent (R + P wide) in one MLA layer."""
    width = args.kv_lora_rank + args.qk_rope_head_dim
    if kv_bits == 16:
        return width * act_bytes
    groups = -(-width // KV_GROUP_SIZE)  # quantized rows are zero-padded to whole groups
    return groups * KV_GROUP_SIZE * kv_bits // 8 + groups * 2 * act_bytes  # packed + scales and biases


def activation_bytes(args: ModelArgs, T: int, context: int, B: int, act: int) -> int:
    """The peak of one prefill step of T tokens, from terms measured per layer kind (MLX, bf16
    activations, 4-bit weights with bf16 scales as on a GPU; one layer's eager prefill at T = 128,
    512 and 2048 with mx.get_peak_memory, linear in T). Layers run one after another and a
    layer's attention and its feed-forward do not overlap (the measured layer peak is the larger
    of the two), so: the residual stream + the largest of the attentions and feed-forwards + the
    logits row. Measured at hidden 576, KDA 8 x 128, 64 experts of 256, top-8, T = 512: KDA
    attention 51.0 MiB (this model 52), MoE 31.5-34.8 MiB (37.5), dense MLP 5.6 (7.3), MLA
    attention 17.3 (25.5); a whole layer 50.8 (the KDA attention)."""
    h = args.hidden_size
    residual = 3 * B * T * h * act  # x, the layer output, the normed input
    H, D = args.kda_heads, args.kda_head_dim
    # KDA (chunked prefill): per token and head ~23 fp32 [D] vectors (q, k, v, g, decays, the
    # chunk terms W, U, the output, their intermediates) and ~6 fp32 rows of the per-chunk [C, C]
    # matrices (decay grams, the triangular inverse).
    kda = 4 * B * T * H * (23 * D + 6 * KDA_CHUNK)
    # MLA: fp32 scores of one key block and their exp [B, H, T, keys] (the block is sized by
    # mla_layer._block_size, so this does not grow with the context), the queries, and for steps of
    # more than ABSORB_MAX_QUERIES tokens one block of expanded per-head keys and values.
    Hm, keys = args.num_attention_heads, min(_block_size(B * args.num_attention_heads * T), context)
    qk, dv = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    # 26 bytes per score of one key block at the peak: fitted to whole prefills of the full-size
    # model on the H200 (bench_gpu.py runs 5 and 7: a 16k / 128k prompt peaked 3.3 GiB higher with
    # 1 GiB than with 512 MB key blocks, 6.6x the block's bytes). One MLA layer evaluated alone
    # peaks at ~3.5x (its bf16 product, fp32 value, masked copy, exp, the bf16 operand of the
    # value product; bench/gpu/prefill_memory.py); why a whole step holds about twice that is not
    # known yet (a second block's scores alive across the layer's evaluations?).
    mla = 26 * B * Hm * T * keys + 4 * B * Hm * T * (qk + args.kv_lora_rank + dv)
    if T > ABSORB_MAX_QUERIES:
        mla += B * Hm * keys * (qk + dv) * act
    has_mla = any(not args.is_kda_layer(i) for i in range(args.num_hidden_layers))
    # MoE: per (token, expert) row: the input gathered in expert order, the expert output, its
    # token-order copy (activation dtype each) and the fp32 weighted rows; gate, up and their
    # product (activation dtype).
    moe = B * T * args.num_experts_per_token * (h * (3 * act + 8) + 3 * args.moe_intermediate_size * act)
    dense = B * T * (3 * args.intermediate_size + h) * act
    logits = B * args.vocab_size * 4  # the last position only (prefill asks for last_only)
    return residual + max(kda, mla if has_mla else 0, moe, dense) + logits


def machine_memory() -> tuple[int, str]:
    """(bytes, what they are). Metal: the GPU's recommended working set (what macOS keeps resident;
    `sudo sysctl iogpu.wired_limit_mb` raises it). Elsewhere the physical memory, not what is free
    right now: a plan should not change with whatever else runs, and the margin is for the OS."""
    if mx.metal.is_available():
        info = mx.device_info()
        return int(info.get("max_recommended_working_set_size") or info["memory_size"]), "Metal working set"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError):
        raise KimiError("cannot read this machine's memory size; pass --memory-gb") from None


def plan_memory(config: dict | ModelArgs, context: int, kv_bits: int | None = None,
                prefill_step: int | None = None, batch: int = 1, memory_bytes: int | None = None,
                backend: str | None = None, weights: tuple[int, dict, str] | None = None,
                dtype: str | None = None, ranks: int = 1, parallel: str = "tensor", rank: int | None = None,
                folder: Path | None = None) -> MemoryPlan:
    """The memory plan of `batch` sequences of `context` tokens (prompt + reply). `config` is
    config.json as a dict, or ModelArgs (whose weights dtype is then taken as bfloat16).
    `backend`: "cpu" or "gpu" (None: this machine's default device). `weights`: (bytes, by format,
    what they were counted from) when known better than from the config (the headers, a loaded
    model); `dtype`: the activation dtype when known (else the config's). `ranks` > 1: the plan
    of one rank of the model split `parallel` (tensor | pipeline) by kimi_mlx.parallel, the fullest
    one unless `rank` is given; `folder`: count its safetensors headers for each rank."""
    from .parallel.load import parallel_mode

    parallel = parallel_mode(parallel)  # checked with one rank too: `plan --parallel bogus` was accepted
    if ranks != 1 and rank is None:
        if not (isinstance(ranks, int) and not isinstance(ranks, bool) and ranks >= 1):
            raise KimiError(f"--ranks {ranks!r}: give a whole number of ranks, at least 1")
        return max((plan_memory(config, context, kv_bits, prefill_step, batch, memory_bytes, backend, weights, dtype,
                                ranks, parallel, r, folder) for r in range(ranks)), key=lambda plan: plan.total)
    cpu = _backend_is_cpu(backend)
    if isinstance(config, ModelArgs):
        args, config_dtype = config, "bfloat16"
    else:
        args, config_dtype = ModelArgs.from_dict(config), config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = dtype or config_dtype
    if dtype not in DTYPE_BYTES:
        raise KimiError(f"config.json: dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    kv_bits = 16 if kv_bits is None else kv_bits
    prefill_step = DEFAULT_PREFILL_STEP if prefill_step is None else prefill_step
    if memory_bytes is not None and memory_bytes <= 0:
        raise KimiError(f"memory of {memory_bytes} bytes: give a positive amount (--memory-gb)")
    if kv_bits not in (16, 8, 4):
        raise KimiError(f"--kv-bits {kv_bits}: the latent cache takes 16, 8 or 4")
    def whole(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if not (whole(context) and whole(batch) and whole(prefill_step)):
        raise KimiError(f"context {context!r}, batch {batch!r}, prefill step {prefill_step!r}: "
                        "each must be a whole number, at least 1")
    if memory_bytes is not None and not whole(memory_bytes):
        raise KimiError(f"memory of {memory_bytes!r} bytes: give a positive whole number (--memory-gb)")
    limit = args.model_max_length or MAX_CONTEXT
    if context > limit:
        raise ContextTooLong(f"context of {context:,} tokens: past this model's maximum of {limit:,} tokens "
                             "(model_max_length in config.json); shorten the prompt or the reply")
    act = DTYPE_BYTES[dtype]
    share, held_layers, state_share = None, range(args.num_hidden_layers), 1.0
    if ranks != 1:
        from .parallel.share import held_share, layers_held

        rank = rank or 0
        check_split(args, ranks, parallel)
        share = lambda name: held_share(name, args.num_hidden_layers, parallel, ranks, rank)  # noqa: E731
        held_layers, state_share = layers_held(args.num_hidden_layers, parallel, ranks, rank)
        if folder is not None:  # the headers, this rank's share of them
            held, by_format, _ = header_weight_bytes(folder, args, cpu, share)
            weights = (held, by_format, "the safetensors headers")
    n_params, held, by_format = weight_bytes(args, dtype, cpu, share)
    source = "config.json"
    if weights is not None:
        held, by_format, source = weights
    kda_layers = sum(args.is_kda_layer(i) for i in held_layers)
    H, D, C = args.kda_heads, args.kda_head_dim, args.kda_heads * args.kda_head_dim
    kda = int(kda_layers * batch * (4 * H * D * D + 3 * (args.conv_kernel - 1) * C * act) * state_share)
    mla_layers = len(held_layers) - kda_layers
    latent = mla_layers * batch * latent_rows(context, prefill_step) * latent_row_bytes(args, kv_bits, act)
    # (a padded batch also keeps a [B, rows] bool key mask per MLA layer: bytes, not counted)
    T = min(prefill_step, context)
    activations = activation_bytes(args, T, context, batch, act)
    available, memory_source = (memory_bytes, "as given") if memory_bytes is not None else machine_memory()
    return MemoryPlan(context, kv_bits, prefill_step, batch, n_params, held, kda, latent, activations,
                      available, memory_source, by_format, backend="cpu" if experts_fp32(cpu) else "gpu",
                      weights_source=source, ranks=ranks, parallel=parallel, rank=rank or 0)


def check_split(args: ModelArgs, ranks: int, parallel: str) -> None:
    """KimiError unless `ranks` can split the model `parallel` (as loading would refuse it)."""
    if parallel == "tensor":
        from .parallel.tensor import check_tensor_split

        check_tensor_split(args, ranks)
    else:
        from .parallel.pipeline import check_pipeline_split

        check_pipeline_split(args.num_hidden_layers, ranks)


def check_context_fits(config: dict | ModelArgs, context: int, kv_bits: int | None = None, **kwargs) -> MemoryPlan:
    """The plan, or ContextTooLong / ContextDoesNotFit (its message holds the plan) when it does not fit.
    Cheap (arithmetic on the config): generation and chat call it before a long prefill."""
    plan = plan_memory(config, context, kv_bits, **kwargs)
    if not plan.fits:
        raise ContextDoesNotFit(f"{context:,} tokens do not fit in memory; the plan (an estimate: "
                                f"--ignore-memory-plan, or ignore_memory_plan=True, runs anyway):\n{plan.format()}")
    return plan


def check_model_context_fits(model, context: int, kv_bits: int | None = None, **kwargs) -> MemoryPlan:
    """check_context_fits for a loaded model: its weights counted as it holds them."""
    held, by_dtype = loaded_weight_bytes(model)
    embed = model.model.embed_tokens
    act = dtype_name(getattr(embed, "scales", embed.weight).dtype)
    return check_context_fits(model.args, context, kv_bits, weights=(held, by_dtype, "the loaded model"),
                              dtype=act if act in FLOAT_BYTES else None, **kwargs)


def gib_to_bytes(memory_gb: float) -> int:
    """--memory-gb as bytes; NaN, inf and amounts <= 0 are refused (one line)."""
    if not (math.isfinite(memory_gb) and memory_gb > 0 and math.isfinite(memory_gb * 2**30)):  # 1e308 GiB overflows
        raise KimiError(f"--memory-gb {memory_gb}: give a positive number of GiB")
    return int(memory_gb * 2**30)


def plan_for_path(path: str | Path, context: int, **kwargs) -> MemoryPlan:
    """plan_memory for a model folder (config.json is enough), 'demo', or a hub repo id (only its
    config.json is downloaded). Safetensors in the folder add their size on disk as a cross-check."""
    local = expand_user(path, "give a model folder, a hub repo id (org/name) or 'demo'")
    if str(path) == "demo":
        folder = demo_model_path()
    elif local.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        folder = resolve_model_path(path)  # a local folder, or its clear error
    else:
        folder = _download_config(str(path))
    config = read_config(folder / "config.json")
    shards = sorted(folder.glob("*.safetensors"))
    if shards:  # the weights are here: count what each tensor will be held as
        cpu = _backend_is_cpu(kwargs.get("backend"))
        held, by_format, act = header_weight_bytes(folder, ModelArgs.from_dict(config), cpu)
        kwargs = {"weights": (held, by_format, "the safetensors headers"), "dtype": act, **kwargs}
        if kwargs.get("ranks", 1) != 1:
            kwargs["folder"] = folder  # each rank's share of the headers
    plan = plan_memory(config, context, **kwargs)
    if shards:
        plan.on_disk = (sum(f.stat().st_size for f in shards), len(shards))
    return plan


def _download_config(repo_id: str) -> Path:
    """The folder of a hub repo's config.json, fetched alone (errors as in loading.download_repo)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json")).parent
    except RepositoryNotFoundError:
        raise KimiError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise KimiError(f"{repo_id}: config.json is not in the local cache and the hub cannot be reached; "
                        "pass a local folder that holds config.json") from None
    except EntryNotFoundError:
        raise KimiError(f"{repo_id}: the repository has no config.json") from None
    except OSError as e:
        raise KimiError(f"{repo_id}: download of config.json failed ({e})") from None
