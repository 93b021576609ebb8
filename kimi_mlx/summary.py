"""A human-readable summary of a model folder (used by `kimi-mlx info`)."""

from __future__ import annotations

from mlx.utils import tree_flatten

from .config import ModelArgs
from .loading import load_model, resolve_model_path


def describe_model(path: str) -> str:
    folder = resolve_model_path(path)
    args = ModelArgs.from_file(folder / "config.json")
    model = load_model(folder)
    params = tree_flatten(model.parameters())
    n_bytes = sum(p.nbytes for _, p in params)
    pattern = "".join("K" if args.is_kda_layer(i) else "M" for i in range(args.num_hidden_layers))
    q = args.quantization
    lines = [
        f"model        {folder}",
        f"layers       {args.num_hidden_layers} ({pattern}; K = KDA, M = MLA)",
        f"hidden       {args.hidden_size}, vocab {args.vocab_size}",
        f"KDA          {args.kda_heads} heads x {args.kda_head_dim}, conv {args.conv_kernel}",
        f"MLA          {args.num_attention_heads} heads, latent {args.kv_lora_rank}+{args.qk_rope_head_dim}",
        f"MoE          {args.num_experts} experts, top-{args.num_experts_per_token}, "
        f"{args.num_shared_experts} shared, first {args.first_k_dense_replace} dense",
        f"weights      {n_bytes / 2**30:.3f} GiB in memory"
        + (f", {q.get('bits')}-bit (group {q.get('group_size')})" if q else ", not quantized"),
    ]
    return "\n".join(lines)
