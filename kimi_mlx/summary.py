"""A human-readable summary of a model folder (used by `kimi-mlx info`).

Read from config.json and the safetensors headers only: no tensor is read and the model's
modules (which import mlx-lm) are not needed. The bytes in memory are what load_model would hold
on this machine's backend (kimi_mlx.plan.header_weight_bytes; tests match it against loaded models).
"""

from __future__ import annotations

from math import prod

from .config import ModelArgs
from .loading import resolve_model_path, safetensors_files
from .plan import header_weight_bytes, parameter_shapes


def describe_model(path: str) -> str:
    folder = resolve_model_path(path)
    args = ModelArgs.from_file(folder / "config.json")
    held, by_format, _ = header_weight_bytes(folder, args)
    on_disk = sum(f.stat().st_size for f in safetensors_files(folder))
    n_params = sum(prod(shape) for shape, _ in parameter_shapes(args).values())
    pattern = "".join("K" if args.is_kda_layer(i) else "M" for i in range(args.num_hidden_layers))
    q = args.quantization
    formats = ", ".join(f"{name} {n / 2**30:.3f}" for name, n in by_format.items())
    lines = [
        f"model        {folder}",
        f"layers       {args.num_hidden_layers} ({pattern}; K = KDA, M = MLA)",
        f"hidden       {args.hidden_size}, vocab {args.vocab_size}",
        f"KDA          {args.kda_heads} heads x {args.kda_head_dim}, conv {args.conv_kernel}",
        f"MLA          {args.num_attention_heads} heads, latent {args.kv_lora_rank}+{args.qk_rope_head_dim}",
        f"MoE          {args.num_experts} experts, top-{args.num_experts_per_token}, "
        f"{args.num_shared_experts} shared, first {args.first_k_dense_replace} dense",
        f"parameters   {n_params / 1e9:.3f}B" if n_params >= 1e8 else f"parameters   {n_params / 1e6:.3f}M",
        f"weights      {held / 2**30:.3f} GiB in memory ({formats} GiB), {on_disk / 2**30:.3f} GiB on disk"
        + (f"; {q.get('bits')}-bit (group {q.get('group_size')})" if q else "; not quantized"),
    ]
    return "\n".join(lines)
