"""Converter memory and throughput on a synthetic checkpoint with real-sized experts.

    python bench/bench_convert.py --size-gb 2            # builds, reads, converts, prints a table

Builds a checkpoint in the ORIGINAL Moonshot layout with the released model's shapes (hidden
2304, expert w1/w3 [1024, 2304] and w2 [2304, 1024] bf16, KDA/MLA projections, dense layer 0),
but fewer experts per layer and a smaller vocabulary, and as many MoE layers as fit --size-gb.
Then, each in its own child process (peak RSS from the OS via wait4; the builder is a child
too, so this process stays small and its memory does not leak into the children's numbers):
  read     every shard read front to back (the floor for any converter);
  convert  `kimi-mlx convert SRC DST` with the given options (default: 4-bit affine g64).
Before each, the source files are dropped from the page cache (Linux, posix_fadvise), so both
read from disk; --warm keeps them cached instead.
Targets (the issue): convert's peak RSS under 3 GB whatever the size; time within 2x of read.
Writes bench/results/bench_convert.json. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASED = {  # models/Kimi-Linear-48B-A3B-Instruct.config.json, shapes only
    "model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "dtype": "bfloat16",
    "hidden_size": 2304, "intermediate_size": 9216, "moe_intermediate_size": 1024,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True,
    "q_lora_rank": None, "num_experts_per_token": 8, "num_shared_experts": 1, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "routed_scaling_factor": 2.446, "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid", "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "model_max_length": 1048576,
    "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839,
}


def layer_tensors(config: dict, i: int) -> dict[str, tuple]:
    """Original-layout names and shapes of layer i (0-based)."""
    H, D = config["linear_attn_config"]["num_heads"], config["linear_attn_config"]["head_dim"]
    hid, p = config["hidden_size"], f"model.layers.{i}."
    t = {p + "input_layernorm.weight": (hid,), p + "post_attention_layernorm.weight": (hid,)}
    if i + 1 in config["linear_attn_config"]["kda_layers"]:
        a = p + "self_attn."
        t.update({a + f"{x}_proj.weight": (H * D, hid) for x in "qkv"})
        t.update({a + f"{x}_conv1d.weight": (H * D, 1, 4) for x in "qkv"})
        t.update({a + "A_log": (1, 1, H, 1), a + "dt_bias": (H * D,), a + "f_a_proj.weight": (D, hid),
                  a + "f_b_proj.weight": (H * D, D), a + "b_proj.weight": (H, hid), a + "g_a_proj.weight": (D, hid),
                  a + "g_b_proj.weight": (H * D, D), a + "o_norm.weight": (D,), a + "o_proj.weight": (hid, H * D)})
    else:
        a, n = p + "self_attn.", config["num_attention_heads"]
        nope, rope, v, r = (config[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"))
        t.update({a + "q_proj.weight": (n * (nope + rope), hid), a + "kv_a_proj_with_mqa.weight": (r + rope, hid),
                  a + "kv_a_layernorm.weight": (r,), a + "kv_b_proj.weight": (n * (nope + v), r),
                  a + "o_proj.weight": (hid, n * v)})
    if i == 0:
        inter = config["intermediate_size"]
        t.update({p + "mlp.gate_proj.weight": (inter, hid), p + "mlp.up_proj.weight": (inter, hid),
                  p + "mlp.down_proj.weight": (hid, inter)})
        return t
    m, inter, E = p + "block_sparse_moe.", config["moe_intermediate_size"], config["num_experts"]
    t.update({m + "gate.weight": (E, hid), m + "gate.e_score_correction_bias": (E,),
              m + "shared_experts.gate_proj.weight": (inter, hid), m + "shared_experts.up_proj.weight": (inter, hid),
              m + "shared_experts.down_proj.weight": (hid, inter)})
    for e in range(E):
        t.update({m + f"experts.{e}.w1.weight": (inter, hid), m + f"experts.{e}.w3.weight": (inter, hid),
                  m + f"experts.{e}.w2.weight": (hid, inter)})
    return t


def make_config(size_gb: float, experts: int, vocab: int) -> dict:
    hid, inter = RELEASED["hidden_size"], RELEASED["moe_intermediate_size"]
    per_moe_layer = 2 * (3 * experts * inter * hid + 3 * inter * hid + 4 * 4096 * hid)
    base = 2 * (2 * vocab * hid + 3 * RELEASED["intermediate_size"] * hid + 4 * 4096 * hid)
    layers = 1 + max(1, round((size_gb * 1e9 - base) / per_moe_layer))
    return {**RELEASED, "vocab_size": vocab, "num_experts": experts, "num_hidden_layers": layers,
            "linear_attn_config": {"num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4,
                                   "full_attn_layers": [layers], "kda_layers": list(range(1, layers))}}


def build(folder: Path, config: dict) -> int:
    """One shard per layer (plus one for embeddings/head), bf16, random; returns total bytes."""
    import mlx.core as mx

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    hid, vocab, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    groups = [{"model.embed_tokens.weight": (vocab, hid), "model.norm.weight": (hid,), "lm_head.weight": (vocab, hid)}]
    groups += [layer_tensors(config, i) for i in range(L)]
    weight_map, total = {}, 0
    for s, shapes in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        arrays = {n: (mx.random.normal(shape) * 0.02).astype(mx.bfloat16) for n, shape in shapes.items()}
        mx.save_safetensors(str(folder / fname), arrays, metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({n: fname for n in arrays})
        del arrays
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


READ = """
import sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
    with open(p, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
"""


def drop_from_cache(folder: Path) -> None:
    """Evict the files' pages from the OS page cache (Linux; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(cmd: list[str]) -> tuple[float, int, str]:
    """Run one child; -> (wall seconds, its peak RSS in bytes from wait4, output)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({proc.returncode}):\n{out}")
    return wall, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--experts", type=int, default=64, help="experts per MoE layer (the model has 256)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp folder, removed after)")
    ap.add_argument("--warm", action="store_true", help="leave the source in the page cache")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)  # child mode: build into this folder
    ap.add_argument("convert_args", nargs="*", help="extra `kimi-mlx convert` options, after --")
    args = ap.parse_args()
    config = make_config(args.size_gb, args.experts, args.vocab)
    if args.build_only:
        print(build(Path(args.build_only), config))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        src, dst = work / "src", work / "dst"
        build_s, _, out = child([sys.executable, __file__, "--build-only", str(src), "--size-gb", str(args.size_gb),
                                 "--experts", str(args.experts), "--vocab", str(args.vocab)])
        size = int(out.split()[-1])
        print(f"built {size / 1e9:.2f} GB: {config['num_hidden_layers']} layers, {args.experts} experts "
              f"of 2304x1024 bf16 per MoE layer, in {build_s:.0f} s")
        cold = not args.warm and hasattr(os, "posix_fadvise")
        if cold:
            drop_from_cache(src)
        read_s, read_rss, _ = child([sys.executable, "-c", READ, str(src)])
        if cold:
            drop_from_cache(src)
        conv_s, conv_rss, out = child([sys.executable, "cli.py", "convert", str(src), str(dst), "--force",
                                       *args.convert_args])
        out_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    # The converter's own time from its summary line ("...; 6.5 s, peak memory ..."): without the
    # process start (~3 s here, mostly mlx-lm importing transformers), which a 98 GB run amortises.
    inner = re.search(r"; ([0-9.]+) s, peak memory", out)
    inner_s = float(inner.group(1)) if inner else conv_s
    rows = [("read", read_s, read_rss), ("convert", conv_s, conv_rss), ("  inside", inner_s, conv_rss)]
    print(f"\nsource {'dropped from' if cold else 'kept in'} the page cache before each run")
    print(f"{'':8} {'seconds':>8} {'GB/s':>6} {'peak RSS':>9}")
    for name, s, rss in rows:
        print(f"{name:8} {s:8.1f} {size / s / 1e9:6.2f} {rss / 1e9:7.2f} GB")
    print(f"\nconvert / read time: {conv_s / read_s:.2f}x, {inner_s / read_s:.2f}x without process start (target <= 2x); "
          f"peak RSS {conv_rss / 1e9:.2f} GB (target < 3 GB); output {out_bytes / 1e9:.2f} GB")
    print(out.strip().splitlines()[-1] if out.strip() else "")
    result = {"source_bytes": size, "output_bytes": out_bytes, "experts": args.experts,
              "layers": config["num_hidden_layers"], "convert_args": args.convert_args,
              "read": {"seconds": read_s, "peak_rss": read_rss},
              "convert": {"seconds": conv_s, "seconds_without_start": inner_s, "peak_rss": conv_rss},
              "ratio": conv_s / read_s, "ratio_without_start": inner_s / read_s, "cold_cache": cold, "load_avg": os.getloadavg()}
    path = ROOT / "bench" / "results" / "bench_convert.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
