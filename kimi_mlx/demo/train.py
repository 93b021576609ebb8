"""Train the demo model: the real Kimi-Linear architecture at tiny size, on the synthetic chat tasks.

    python -m kimi_mlx.demo.train --out /tmp/demo [--steps N | --steps 0 --minutes M] [--compile]
        [--device cpu|gpu] [--tokens 32768] [--workers 6] [--resume /tmp/demo/checkpoint]

Runs on any MLX device (CPU, Metal, CUDA): the initial weights come from NumPy's seeded rng and
the chats from Python's seeded rng, so the device changes only the arithmetic. The shipped v2
model was trained on an H200 with MLX's CUDA backend (training.json records the command, the
data seeds and the device). On a CPU it works, slowly (LD_PRELOAD an OpenBLAS on Linux).
--steps 0 picks the step count from the measured step time so training ends within --minutes.
A checkpoint (fp32 weights, optimizer state, stream position) is written to OUT/checkpoint every
--checkpoint-minutes and at the end; --resume continues from it exactly (same batches, same
schedule).

8 layers K K K M K K K M (KDA:MLA 3:1, as the released model), layer 0 dense SwiGLU, layers 1..7
MoE (8 experts, top-2, one shared expert, sigmoid router with the correction bias, routed
scaling 2.446). It IS kimi_mlx.Model, trained through the chunked KDA path with MLX autodiff.
Loss only on the assistant replies. The router's e_score_correction_bias is not trained by
gradient: it is nudged toward balanced expert loads after each step (auxiliary-loss-free
balancing, as DeepSeek-V3 and Kimi train it).
Writes kimi_mlx/demo/model/: config.json (released format), model.safetensors (original
Moonshot layout, bf16), tiktoken.model and tokenizer_config.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ModelArgs
from ..experts import experts_gather, set_expert_path
from ..kda import set_kda_path
from ..loading import load_model
from ..model import Model
from ..moe import SparseMoE
from ..moe_route import route_ops  # the ops router: our route kernel has no gradient
from ..tokenizer import load_tokenizer
from . import bpe, data
from .batches import BUCKETS, BatchStream, StreamSpec, encode
from .checkpoint import save_original
from .evaluate import score_examples

MODEL_DIR = Path(__file__).parent / "model"
NUM_RANKS = 672  # BPE ranks (about all the corpus can give); + 256 special ids = vocab 928
SEED = 0

# config.json in the released format (same keys as models/Kimi-Linear-48B-A3B-Instruct.config.json).
DEMO_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_kimi.KimiLinearConfig",
        "AutoModel": "modeling_kimi.KimiLinearModel",
        "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
    },
    "bos_token_id": NUM_RANKS,
    "dtype": "bfloat16",
    "eos_token_id": NUM_RANKS + 2,
    "first_k_dense_replace": 1,
    "head_dim": 72,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 384,
    "kv_lora_rank": 64,
    "linear_attn_config": {
        "full_attn_layers": [4, 8],
        "head_dim": 32,
        "kda_layers": [1, 2, 3, 5, 6, 7],
        "num_heads": 2,
        "short_conv_kernel_size": 4,
    },
    "mla_use_nope": True,
    "model_max_length": 1048576,
    "model_type": "kimi_linear",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 4,
    "num_expert_group": 1,
    "num_experts": 8,
    "num_experts_per_token": 2,
    "num_hidden_layers": 8,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "pad_token_id": NUM_RANKS + 255,
    "q_lora_rank": None,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "transformers_version": "4.57.0",
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 32,
    "vocab_size": NUM_RANKS + 256,
}

# v2 (trained on a GPU): wider, with a wider MLA (8 heads, latent rank 128) and wider experts;
# every width a multiple of 64 so 4-bit groups fit. ~6.4M parameters, ~13 MB in bf16.
V2_CONFIG = dict(
    DEMO_CONFIG, hidden_size=192, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=8,
    num_key_value_heads=8, kv_lora_rank=128,
    linear_attn_config=dict(DEMO_CONFIG["linear_attn_config"], num_heads=4, head_dim=32),
)
CONFIGS = {"v1": DEMO_CONFIG, "v2": V2_CONFIG}
# v2's chat mix (per chat; steps are counted in tokens, so long tasks get more of each step).
V2_WEIGHTS = {"addition": 2.5, "copy": 0.5, "reverse": 1.0, "count": 2.0, "recall": 2.5, "retrieval": 1.5}


# ---------------------------------------------------------------- model


def init_params(model: Model, seed: int) -> None:
    """Fan-in normal projections (outputs into the residual scaled by 1/sqrt(2 layers)), unit
    embeddings, PyTorch's conv init, and the gates of fla / transformers' KDA init."""
    rng = np.random.default_rng(seed)
    n_layers = model.args.num_hidden_layers
    new = {}
    for name, p in tree_flatten(model.parameters()):
        shape = p.shape
        if name.endswith("A_log"):  # per-head decay rate in [1, 16]
            w = np.log(rng.uniform(1, 16, shape))
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in [1e-3, 1e-1], log-uniform
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            w = dt + np.log(-np.expm1(-dt))
        elif name.endswith("e_score_correction_bias"):
            w = np.zeros(shape)
        elif "conv.weight" in name:  # [C, K, 1], fan-in K
            w = rng.uniform(-1, 1, shape) / math.sqrt(shape[1])
        elif name.endswith("embed_tokens.weight"):
            w = rng.normal(0, 1, shape)
        elif name.endswith("embed_q.weight"):  # [H, R, Dn], fan-in R (kv_b_proj's input)
            w = rng.normal(0, 1, shape) / math.sqrt(shape[1])
        elif p.ndim >= 2:  # [.., out, in]
            std = 1 / math.sqrt(shape[-1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * n_layers)
            w = rng.normal(0, std, shape)
        else:  # norms
            w = np.ones(shape)
        new[name] = mx.array(w.astype(np.float32))
    model.load_weights(list(new.items()), strict=True)


def experts_dense(mlp, x: mx.array, ids: mx.array, weights: mx.array) -> mx.array:
    """Every expert on every token, then the routing weights (0 for experts not chosen).

    Same signature and result as kimi_mlx.experts.experts_gather (the reference):
    x [N, D], ids / weights [N, k] -> [N, D] = sum_j weights[:, j] * expert_{ids[:, j]}(x).
    E/k times the expert FLOPs, but only plain batched matmuls: on a GPU, where this tiny model's
    step is bound by kernel launches, that beats gather's sort and gathers, and training needs no
    gather_mm gradient. For float SwitchGLU experts only (training).
    """
    E = mlp.gate_proj.weight.shape[0]
    xs = x.astype(mlp.gate_proj.weight.dtype)[None]  # [1, N, D]
    up = xs @ mlp.up_proj.weight.swapaxes(-1, -2)  # [E, N, I]
    gate = xs @ mlp.gate_proj.weight.swapaxes(-1, -2)  # [E, N, I]
    y = mlp.activation(up, gate) @ mlp.down_proj.weight.swapaxes(-1, -2)  # [E, N, D]
    chosen = (ids[..., None] == mx.arange(E)).astype(weights.dtype)  # [N, k, E]
    dense = (chosen * weights[..., None]).sum(axis=1)  # [N, E] routing weight of every expert
    return (dense.T[..., None] * y).sum(axis=0).astype(x.dtype)


class TrainingMoE(SparseMoE):
    """SparseMoE as training runs it: the same parameters and output, and it keeps its last router
    logits (`last_logits`, a plain attribute) for the balancing. Routed experts on the gather path
    (kimi_mlx.experts' reference), or through experts_dense in DenseTrainingMoE."""

    experts = staticmethod(experts_gather)

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.router_logits(x)  # [B, T, E] fp32
        object.__setattr__(self, "last_logits", logits)  # not a parameter
        ids, weights = route_ops(logits, self.e_score_correction_bias, self.top_k, self.renormalize, self.scale)
        B, T, D = x.shape
        y = self.experts(self.switch_mlp, x.reshape(B * T, D), ids.reshape(B * T, -1), weights.reshape(B * T, -1))
        y = y.reshape(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DenseTrainingMoE(TrainingMoE):
    experts = staticmethod(experts_dense)


def training_moes(model: Model, experts: str) -> list:
    """Turn the model's MoE layers into TrainingMoE ("gather") or DenseTrainingMoE ("dense") in
    place (parameters untouched); returns them."""
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    for moe in moes:
        moe.__class__ = DenseTrainingMoE if experts == "dense" else TrainingMoE
    return moes


def router_loads(moes, valid: mx.array) -> mx.array:
    """Fraction of routed slots per expert over the real tokens, [layers, E], from each router's
    last logits (the choice as the model makes it: sigmoid score + correction bias, top-k)."""
    loads = []
    w = valid.reshape(-1, 1).astype(mx.float32)
    for moe in moes:
        logits = mx.stop_gradient(moe.last_logits).reshape(-1, moe.e_score_correction_bias.shape[0])
        choice = mx.sigmoid(logits) + moe.e_score_correction_bias
        ids = mx.argpartition(-choice, kth=moe.top_k - 1, axis=-1)[:, : moe.top_k]
        onehot = (ids[..., None] == mx.arange(choice.shape[-1])).any(axis=1).astype(mx.float32)  # [N, E]
        loads.append((onehot * w).sum(0) / (w.sum() * moe.top_k))
    return mx.stack(loads)


def balance_routers(moes, loads: mx.array, rate: float) -> None:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
    for moe, load in zip(moes, loads):
        moe.e_score_correction_bias = moe.e_score_correction_bias + rate * mx.sign(1 / load.shape[-1] - load)


# ---------------------------------------------------------------- training


def tune_cpu() -> None:
    """Two settings that made a step ~1.5x faster on this project's 2-core Linux (gVisor) machine.

    - glibc keeps freed activations instead of unmapping them (page faults are costly there):
      M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD and M_TOP_PAD large.
    - A preloaded OpenBLAS gets one thread: its spinning second thread cost a core of sys time.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_TOP_PAD, 256 << 20)
    if hasattr(libc, "openblas_set_num_threads"):
        libc.openblas_set_num_threads(1)


def device_info() -> dict:
    """The MLX device training runs on, for training.json."""
    backend = "cpu"
    if mx.default_device() == mx.gpu:
        backend = "cuda" if hasattr(mx, "cuda") and mx.cuda.is_available() else "metal"
    info = {"device": str(mx.default_device()), "backend": backend, "mlx": mx.__version__}
    try:
        name = mx.device_info().get("device_name") if hasattr(mx, "device_info") else None
        if name:
            info["device_name"] = name
    except Exception:  # noqa: BLE001 (a name is nice to have, never worth failing a run)
        pass
    return info


def make_loss_fn(moes, pad_id: int):
    """loss_fn(model, inputs, targets, mask) -> (mean reply CE, (token accuracy, router loads [layers, E]))."""

    def loss_fn(model, inputs, targets, mask):
        logits = model(inputs).astype(mx.float32)  # [B, L, vocab]
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        n = mask.sum()
        correct = ((logits.argmax(-1) == targets) * mask).sum()
        return (ce * mask).sum() / n, (correct / n, router_loads(moes, inputs != pad_id))

    return loss_fn


def lr_at(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from 1% of lr over `warmup` steps, then cosine to 5% of lr at `total`."""
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def make_step(model, opt, moes, pad_id: int, balance_rate: float, compiled: bool):
    """One training step: gradients, clip at norm 1, AdamW, router balancing. With `compiled`,
    mx.compile traces it once per batch shape (the BUCKETS) and replays the fused graph: on a GPU a
    step of this tiny model is bound by kernel launches and Python, not arithmetic."""
    value_and_grad = nn.value_and_grad(model, make_loss_fn(moes, pad_id))

    def step(inputs, targets, mask):
        (loss, (acc, loads)), grads = value_and_grad(model, inputs, targets, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        balance_routers(moes, loads, balance_rate)
        return loss, acc

    if not compiled:
        return step
    state = [model.state, opt.state]
    return mx.compile(step, inputs=state, outputs=state)


def save_checkpoint(folder: Path, model, opt, info: dict) -> None:
    """fp32 weights, the optimizer state and info (step, schedule, stream position) into folder,
    each file written beside and renamed, state.json last (a checkpoint is whole once it exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tree in (("weights", model.parameters()), ("optimizer", opt.state)):
        tmp = folder / f".{name}.partial.safetensors"
        mx.save_safetensors(str(tmp), dict(tree_flatten(tree)))
        tmp.replace(folder / f"{name}.safetensors")
    tmp = folder / ".state.partial.json"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(folder / "state.json")


def load_checkpoint(folder: Path, model, opt) -> dict:
    """Restore what save_checkpoint wrote; returns its info."""
    info = json.loads((folder / "state.json").read_text())
    model.load_weights(list(mx.load(str(folder / "weights.safetensors")).items()), strict=True)
    flat = mx.load(str(folder / "optimizer.safetensors"))
    opt.state = tree_unflatten(list(flat.items()))
    return info


def _paths_restored(fn):
    """Run `fn` with training's path switches (set inside it), then put them back to the
    environment / auto: a process that trains and then generates must not keep training's paths."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            set_kda_path(None)
            set_expert_path(None)
    return wrapper


@_paths_restored
def train(out: Path, *, steps: int, minutes: float, lr: float, tokens_per_batch: int, config: dict,
          weights: dict, multi_turn: float, seed: int = SEED, data_seed: int = data.TRAIN_SEED,
          warmup: int = 100, compiled: bool = False, workers: int = 0, log_every: int = 20,
          eval_every: int = 0, checkpoint_minutes: float = 5.0, resume: Path | None = None,
          init_from: Path | None = None, tokenizer_from: Path | None = MODEL_DIR, command: list | None = None,
          final_eval: int = 50, pool: int = 8192, stop_after: int = 0, experts: str = "auto") -> dict:
    """Train (from scratch, from `init_from`'s weights, or resuming `resume`), save the model in
    the original layout into `out`, and write out/training.json. Returns training.json's dict.

    steps: the LR schedule's length; 0 = choose it after `warmup` steps from the measured step time
    so that training ends within `minutes` (the wall-clock cap in any case).
    stop_after: end this run after that many steps (0: no limit), e.g. to spread the schedule
    over several calls with --resume.
    experts: "gather" (kimi_mlx.experts' reference), "dense" (experts_dense) or "auto" (dense on a
    GPU, gather on the CPU, where E/k times the expert FLOPs costs).
    """
    t_start = time.perf_counter()
    if mx.default_device() == mx.cpu:
        tune_cpu()
    out.mkdir(parents=True, exist_ok=True)
    set_kda_path("chunked")
    set_expert_path("gather")  # the grouped path reads expert counts on the host mid-graph
    if init_from is not None:  # its tokenizer and config
        tokenizer_from, config = init_from, json.loads((Path(init_from) / "config.json").read_text())
    if tokenizer_from is None:
        corpus = [data.chat_text(e.conversation()) for e in data.generate(20000, data.TRAIN_SEED)]
        tokenizer = bpe.build_tokenizer(out, corpus, NUM_RANKS)
    else:
        for name in ("tiktoken.model", "tokenizer_config.json"):
            if Path(tokenizer_from).resolve() != out.resolve():
                shutil.copy(Path(tokenizer_from) / name, out / name)
        tokenizer = load_tokenizer(out)
    args = ModelArgs.from_dict(config)
    if tokenizer.vocab_size != args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, config vocab_size {args.vocab_size}")
    model = Model(args)
    init_params(model, seed)
    if init_from is not None:
        model.load_weights(list(tree_flatten(load_model(init_from, dtype=mx.float32).parameters())), strict=True)
    if experts == "auto":
        experts = "gather" if mx.default_device() == mx.cpu else "dense"
    moes = training_moes(model, experts)
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    opt = optim.AdamW(learning_rate=lr, betas=[0.9, 0.98], weight_decay=0.01)
    spec = StreamSpec(data_seed, dict(weights), multi_turn, tokens_per_batch, pool)
    step, position, prior_seconds, losses, accs, dropped = 0, (0, 0), 0.0, [], [], 0
    if resume is not None:
        info = load_checkpoint(Path(resume), model, opt)
        step, position, prior_seconds = info["step"], tuple(info["position"]), info["train_seconds"]
        steps, warmup, dropped = info["steps"], info["warmup"], info["dropped"]
        if info["stream"] != spec.__dict__ | {"buckets": list(spec.buckets)}:
            raise ValueError(f"--resume {resume}: its stream {info['stream']} differs from this run's")
        print(f"resumed at step {step} (stream position {position})", flush=True)
    opt.init(model.trainable_parameters())  # the state exists before a compiled step captures it
    mx.eval(model.parameters(), opt.state)
    dev = device_info()
    print(f"params {n_params / 1e6:.2f}M; vocab {args.vocab_size}; {dev}; "
          f"{tokens_per_batch} tokens per step in shapes {[(tokens_per_batch // L, L) for L in BUCKETS]}",
          flush=True)

    step_fn = make_step(model, opt, moes, tokenizer.pad_token_id, 1e-3, compiled)
    stream = BatchStream(tokenizer, out, spec, position, workers)
    eval_set = data.heldout(10, data.EVAL_SEED + 7, split=True)
    deadline = t_start + minutes * 60
    t_eval, t_ckpt, times = 0.0, time.perf_counter(), []
    ckpt_dir = out / "checkpoint"

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, model, opt, {
            "step": step, "steps": steps, "warmup": warmup, "position": list(stream.position),
            "train_seconds": prior_seconds + train_seconds(), "dropped": dropped + stream.dropped,
            "stream": spec.__dict__ | {"buckets": list(spec.buckets)}, "lr": lr, "seed": seed,
        })

    t_loop = time.perf_counter()

    def train_seconds() -> float:
        return time.perf_counter() - t_loop - t_eval

    pending: list = []
    t_prev = time.perf_counter()
    try:
        first = step
        while (steps == 0 or step < steps) and time.perf_counter() < deadline:
            if stop_after and step - first >= stop_after:
                break
            inputs, targets, mask = (mx.array(a) for a in next(stream))
            opt.learning_rate = lr_at(step, lr, warmup, steps or 10**9)
            loss, acc = step_fn(inputs, targets, mask)
            # Queue this step and read the previous one's loss meanwhile: the host builds step
            # n+1's graph while the device runs step n.
            mx.async_eval(loss, acc, model.parameters(), opt.state)
            pending.append((loss, acc))
            if len(pending) > 1:
                done_loss, done_acc = pending.pop(0)
                losses.append(done_loss.item())
                accs.append(done_acc.item())
            now = time.perf_counter()
            times.append(now - t_prev)  # wall clock per step: data, graph and device together
            t_prev = now
            step += 1
            if steps == 0 and step == warmup:  # the schedule's length from the measured step time
                per_step = float(np.median(times[len(times) // 2:]))
                left = deadline - time.perf_counter() - 0.05 * minutes * 60  # 5% for checkpoints, lag
                steps = step + max(1, int(left / per_step))
                print(f"step time {per_step * 1e3:.1f} ms (median of steps {len(times) // 2}..{step}): "
                      f"schedule set to {steps} steps", flush=True)
            if step % log_every == 0 and losses:
                print(f"step {step:6d}  loss {np.mean(losses[-log_every:]):.4f}  token-acc "
                      f"{np.mean(accs[-log_every:]):.3f}  lr {lr_at(step, lr, warmup, steps or 10**9):.2e}  "
                      f"{np.median(times[-log_every:]) * 1e3:6.1f} ms/step  "
                      f"{(prior_seconds + train_seconds()) / 60:5.1f} min", flush=True)
            if eval_every and step % eval_every == 0:  # not counted in the training time
                t0 = time.perf_counter()
                scores = score_examples(model, tokenizer, eval_set)
                t_eval += time.perf_counter() - t0
                t_prev = time.perf_counter()
                print("  held-out " + "  ".join(f"{t} {a:.0%}" for t, a in scores.items()), flush=True)
            if checkpoint_minutes and time.perf_counter() - t_ckpt > checkpoint_minutes * 60:
                checkpoint()
                t_ckpt = time.perf_counter()
                t_prev = t_ckpt  # a checkpoint's time is not a step's
    finally:
        stream.close()
    for done_loss, done_acc in pending:
        losses.append(done_loss.item())
        accs.append(done_acc.item())
    checkpoint()
    dropped += stream.dropped
    seconds = prior_seconds + train_seconds()
    final_loss = float(np.mean(losses[-log_every:])) if losses else float("nan")
    per_step = float(np.median(times[len(times) // 2:])) if times else float("nan")
    print(f"trained to step {step} of {steps} in {seconds / 60:.1f} min ({per_step * 1e3:.1f} ms/step median); "
          f"final loss {final_loss:.4f}; {dropped} over-long chats dropped", flush=True)

    save_original(model, config, out)
    check_saved(model, out, tokenizer)
    stages = [] if init_from is None else training_stages(Path(init_from))
    stages.append({"data_seed": data_seed, "pools": stream.position[0] + (stream.position[1] > 0),
                   "chats_per_pool": spec.pool, "weights": weights, "multi_turn": multi_turn,
                   "holdout": "split"})
    reproduce = None
    if command:  # the same run with the schedule's length fixed (--steps 0 chose it from the clock)
        reproduce = list(command)
        if "--minutes" in reproduce:  # the clock cap of this device; the default cap is generous
            del reproduce[reproduce.index("--minutes"):reproduce.index("--minutes") + 2]
        if "--steps" in reproduce:
            reproduce[reproduce.index("--steps") + 1] = str(steps)
        else:
            reproduce += ["--steps", str(steps)]
    info = {
        "command": command, "reproduce": reproduce, "device": dev, "seed": seed, "steps": step, "schedule_steps": steps,
        "warmup": warmup, "data_stages": stages, "heldout": "split",
        "heldout_rule": f"crc32(user prompt) % {data.HELDOUT_MOD} == 0 never trained on",
        "stream": spec.__dict__ | {"buckets": list(spec.buckets)}, "chats_dropped_too_long": dropped,
        "init_from": None if init_from is None else json.loads((Path(init_from) / "training.json").read_text()),
        "tokens_per_batch": tokens_per_batch, "lr": lr, "compiled": compiled, "experts": experts,
        "train_minutes": round(seconds / 60, 2), "step_ms_median": round(per_step * 1e3, 2),
        "final_loss": round(final_loss, 4), "params": n_params,
    }
    if final_eval:
        unseen = data.heldout(final_eval, data.EVAL_SEED, split=True)
        shipped = score_examples(load_model(out, dtype=mx.float32), tokenizer, unseen)
        print(f"final, {final_eval} held-out chats per task, saved bf16 weights: "
              + "  ".join(f"{t} {a:.0%}" for t, a in shipped.items()), flush=True)
        info[f"heldout_accuracy_{final_eval}"] = shipped
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def training_stages(folder: Path) -> list[dict]:
    """The chat streams of every training stage behind a saved demo model (a first model's
    training.json has no stages: one stage of the default stream)."""
    info = json.loads((folder / "training.json").read_text())
    return info.get("data_stages") or [{"data_seed": data.TRAIN_SEED, "chats": info["chats_drawn"],
                                        "weights": data.TASK_WEIGHTS, "multi_turn": 0.0}]


def seen_in_training(stages: list[dict]) -> set[str]:
    """Every user prompt the stages drew (replayed from their seeded streams). Only for models
    trained on whole streams (v1); a v2 model holds its evaluation prompts out by the split."""
    if any(st.get("holdout") for st in stages):
        raise ValueError("this model was trained with the held-out split: evaluate on data.heldout(split=True)")
    return set().union(*(data.seen_prompts(st["chats"], st["data_seed"], st["weights"], st["multi_turn"])
                         for st in stages))


def check_saved(model: Model, folder: Path, tokenizer) -> None:
    """The folder loads with kimi_mlx.load_model and matches the in-memory model rounded to bf16."""
    loaded = load_model(folder, dtype=mx.float32)
    rounded = Model(model.args)
    rounded.load_weights([(n, w if n.endswith(("A_log", "dt_bias", "e_score_correction_bias"))
                           else w.astype(mx.bfloat16).astype(mx.float32))
                          for n, w in tree_flatten(model.parameters())])
    ex = data.heldout(1, data.EVAL_SEED, tasks=("recall",))[0]
    ids = mx.array([encode(tokenizer, (ex,))[0]])
    want, got = rounded(ids), loaded(ids)
    err = mx.abs(want - got).max().item()
    full = mx.abs(model(ids) - got).max().item()
    print(f"saved checkpoint: max |logit diff| vs bf16-rounded in-memory model {err:.2e} "
          f"(vs fp32 in-memory {full:.2e})", flush=True)
    if err > 1e-3:
        raise AssertionError(f"{folder}: reloaded model differs from the trained one by {err}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="v2", help="model size (v1: the first demo)")
    parser.add_argument("--steps", type=int, default=1700,
                        help="the LR schedule's length; 0: as many as fit in --minutes (measured after warm-up)")
    parser.add_argument("--minutes", type=float, default=90, help="wall-clock cap on the whole run")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps (also the timing window for --steps 0)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (padding included)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: MLX's default device")
    parser.add_argument("--compile", action="store_true", help="mx.compile the training step")
    parser.add_argument("--experts", choices=["auto", "gather", "dense"], default="auto",
                        help="routed experts in training: gather matmuls, or every expert densely (auto: dense on a GPU)")
    parser.add_argument("--workers", type=int, default=0, help="processes that build batches ahead")
    parser.add_argument("--pool", type=int, default=8192, help="chats per pool (batches are cut per pool)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--final-eval", type=int, default=50, help="held-out chats per task scored at the end")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--resume", type=Path, default=None, help="continue from OUT/checkpoint of an earlier run")
    parser.add_argument("--stop-after", type=int, default=0, help="end this run after this many steps")
    parser.add_argument("--init-from", type=Path, default=None, help="continue training this saved demo model")
    parser.add_argument("--tokenizer-from", type=Path, default=MODEL_DIR,
                        help="copy the tokenizer files from this model folder; 'new' trains a BPE")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the initial weights")
    parser.add_argument("--data-seed", type=int, default=data.TRAIN_SEED, help="seed of the chat stream")
    parser.add_argument("--weights", nargs="*", default=[], metavar="TASK=W", help="task mix, e.g. count=3")
    parser.add_argument("--multi-turn", type=float, default=0.1, help="share of 2-3 turn chats")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="override config.json fields, e.g. moe_intermediate_size=64")
    a = parser.parse_args(argv)
    if a.device is not None:
        mx.set_default_device(mx.gpu if a.device == "gpu" else mx.cpu)
    config = json.loads(json.dumps(CONFIGS[a.config]))
    for item in a.set:
        key, value = item.split("=", 1)
        config[key] = json.loads(value)
    weights = dict(V2_WEIGHTS if a.config == "v2" else data.TASK_WEIGHTS)
    for item in a.weights:
        task, w = item.split("=", 1)
        if task not in data.MAKERS:
            parser.error(f"--weights: unknown task {task!r}; tasks: {', '.join(data.MAKERS)}")
        weights[task] = float(w)
    command = ["python", "-m", "kimi_mlx.demo.train", *(sys.argv[1:] if argv is None else argv)]
    train(a.out, steps=a.steps, minutes=a.minutes, lr=a.lr, tokens_per_batch=a.tokens, config=config,
          weights=weights, multi_turn=a.multi_turn, seed=a.seed, data_seed=a.data_seed, warmup=a.warmup,
          compiled=a.compile, workers=a.workers, log_every=a.log_every, eval_every=a.eval_every,
          checkpoint_minutes=a.checkpoint_minutes, resume=a.resume, init_from=a.init_from,
          tokenizer_from=None if str(a.tokenizer_from) == "new" else a.tokenizer_from, command=command,
          final_eval=a.final_eval, pool=a.pool, stop_after=a.stop_after, experts=a.experts)


if __name__ == "__main__":
    main()
