"""Train the demo model: the real Kimi-Linear architecture at tiny size, on the synthetic chat tasks.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python -m kimi_mlx.demo.train [--minutes 30]

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
import json
import math
import random
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..config import ModelArgs
from ..experts import set_expert_path
from ..kda import set_kda_path
from ..loading import load_model
from ..model import Model
from ..tokenizer import load_tokenizer
from . import bpe, data
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


class RecordingGate(nn.Linear):
    """The router's Linear, also keeping its last logits so training can measure expert loads."""

    def __call__(self, x):
        out = super().__call__(x)
        object.__setattr__(self, "last_logits", out)  # a plain attribute, not a parameter
        return out


def add_recording_gates(model: Model) -> list:
    moes = []
    for layer in model.layers:
        moe = layer.mlp
        if hasattr(moe, "gate"):
            gate = RecordingGate(*moe.gate.weight.shape[::-1], bias=False)
            gate.weight = moe.gate.weight
            moe.gate = gate
            moes.append(moe)
    return moes


def balance_routers(moes, rate: float, valid: mx.array) -> mx.array:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.
    Returns the loads [layers, E] (fraction of routed slots per expert) for logging."""
    loads = []
    w = valid.reshape(-1, 1).astype(mx.float32)
    for moe in moes:
        logits = mx.stop_gradient(moe.gate.last_logits).reshape(-1, moe.e_score_correction_bias.shape[0])
        choice = mx.sigmoid(logits) + moe.e_score_correction_bias
        ids = mx.argpartition(-choice, kth=moe.top_k - 1, axis=-1)[:, : moe.top_k]
        onehot = (ids[..., None] == mx.arange(choice.shape[-1])).any(axis=1).astype(mx.float32)  # [N, E]
        load = (onehot * w).sum(0) / (w.sum() * moe.top_k)
        moe.e_score_correction_bias = moe.e_score_correction_bias + rate * mx.sign(1 / choice.shape[-1] - load)
        loads.append(load)
    return mx.stack(loads)


# ---------------------------------------------------------------- data


def encode(tokenizer, chat: tuple[data.Example, ...]) -> tuple[list[int], list[bool]]:
    """(ids of the whole chat, which ids are reply tokens to learn). Turns are rendered one at a
    time, as kimi_mlx.chat does (the template renders each turn alone)."""
    ids, is_reply = [], []
    for example in chat:
        prompt = tokenizer.apply_chat_template(list(example.messages), add_generation_prompt=True)
        reply = tokenizer.encode(example.answer) + [tokenizer.eos_token_id]
        ids += prompt + reply
        is_reply += [False] * len(prompt) + [True] * len(reply)
    return ids, is_reply


def batches(tokenizer, seed: int, tokens_per_batch: int, weights: dict = data.TASK_WEIGHTS,
            multi_turn: float = data.MULTI_TURN_RATE, pool: int = 1024, multiple: int = 16):
    """Endless (inputs [B, L], targets [B, L], loss mask [B, L], drawn) batches of similar-length chats.

    Chats come from data.stream(seed) in order, `pool` at a time, grouped by length. Right padding
    with [PAD]: the model is causal, so padding after a chat never changes it.
    """
    examples = data.stream(seed, weights, multi_turn)
    shuffle = random.Random(seed + 1)
    pad = tokenizer.pad_token_id
    drawn = 0  # chats taken from the stream so far (the prompts training may have seen)
    while True:
        drawn += pool
        encoded = sorted((encode(tokenizer, next(examples)) for _ in range(pool)), key=lambda e: len(e[0]))
        groups, group = [], []
        for e in encoded:  # ascending length: a group's padded length is set by its last chat
            L = -(-(len(e[0]) - 1) // multiple) * multiple
            if group and (len(group) + 1) * L > tokens_per_batch:
                groups.append(group)
                group = []
            group.append(e)
        groups.append(group)
        shuffle.shuffle(groups)
        for group in groups:
            L = -(-max(len(ids) - 1 for ids, _ in group) // multiple) * multiple
            inputs = np.full((len(group), L), pad, np.int32)
            targets = np.full((len(group), L), pad, np.int32)
            mask = np.zeros((len(group), L), np.float32)
            for r, (ids, is_reply) in enumerate(group):
                n = len(ids) - 1
                inputs[r, :n] = ids[:-1]
                targets[r, :n] = ids[1:]
                mask[r, :n] = is_reply[1:]  # predict every reply token (and <|im_end|>)
            yield mx.array(inputs), mx.array(targets), mx.array(mask), drawn


# ---------------------------------------------------------------- training


def tune_cpu() -> None:
    """Two settings that made a step ~1.5x faster on this project's 2-core Linux (gVisor) machine.

    - glibc keeps freed activations instead of unmapping them (page faults are costly there):
      M_MMAP_THRESHOLD 32 MB, M_TRIM_THRESHOLD and M_TOP_PAD large.
    - A preloaded OpenBLAS gets one thread: its spinning second thread cost a core of sys time.
    """
    import ctypes
    import sys

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



def loss_fn(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    n = mask.sum()
    correct = ((logits.argmax(-1) == targets) * mask).sum()
    return (ce * mask).sum() / n, correct / n


def train(minutes: float, max_steps: int, out: Path, lr: float, tokens_per_batch: int, eval_every: int,
          log_every: int, seed: int = SEED, config: dict = DEMO_CONFIG, init_from: Path | None = None,
          data_seed: int = data.TRAIN_SEED, weights: dict = data.TASK_WEIGHTS,
          multi_turn: float = data.MULTI_TURN_RATE) -> None:
    """Train from scratch, or continue a saved demo model (`init_from`: its weights and its
    tokenizer files; a new LR schedule; chats from `data_seed`, so not the ones seen before)."""
    tune_cpu()
    t_start = time.perf_counter()
    mx.random.seed(seed)
    set_kda_path("chunked")
    set_expert_path("gather")  # the grouped path reads expert counts on the host mid-graph
    if init_from is None:
        corpus = [data.chat_text(e.conversation()) for e in data.generate(20000, data.TRAIN_SEED)]
        tokenizer = bpe.build_tokenizer(out, corpus, NUM_RANKS)
    else:
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        for name in ("tiktoken.model", "tokenizer_config.json"):
            if Path(init_from).resolve() != out.resolve():
                shutil.copy(Path(init_from) / name, out / name)
        tokenizer = load_tokenizer(out)
        config = json.loads((Path(init_from) / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    assert tokenizer.vocab_size == args.vocab_size, (tokenizer.vocab_size, args.vocab_size)
    model = Model(args)
    init_params(model, seed)
    if init_from is not None:
        model.load_weights(list(tree_flatten(load_model(init_from, dtype=mx.float32).parameters())), strict=True)
    moes = add_recording_gates(model)
    model.freeze(keys=["e_score_correction_bias"], strict=False)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    print(f"params {n_params / 1e6:.2f}M; vocab {args.vocab_size}", flush=True)

    warmup = max(1, min(100, max_steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr * 0.01, lr, warmup), optim.cosine_decay(lr, max_steps - warmup, lr * 0.05)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.98], weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    eval_set = data.heldout(10, data.EVAL_SEED + 7)
    stream = batches(tokenizer, data_seed, tokens_per_batch, weights, multi_turn)
    losses, accs, step, drawn, t_eval = [], [], 0, 0, 0.0
    while step < max_steps and time.perf_counter() - t_start - t_eval < minutes * 60:
        inputs, targets, mask, drawn = next(stream)
        (loss, acc), grads = step_fn(model, inputs, targets, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        balance_routers(moes, 1e-3, inputs != tokenizer.pad_token_id)
        mx.eval(model.parameters(), opt.state, loss, acc)
        losses.append(loss.item())
        accs.append(acc.item())
        step += 1
        if step % log_every == 0:
            elapsed = time.perf_counter() - t_start - t_eval
            print(f"step {step:5d}  loss {np.mean(losses[-log_every:]):.4f}  token-acc "
                  f"{np.mean(accs[-log_every:]):.3f}  lr {schedule(mx.array(step)).item():.2e}  "
                  f"{elapsed / 60:5.1f} min", flush=True)
        if step % eval_every == 0:  # not counted in the training time
            t0 = time.perf_counter()
            scores = score_examples(model, tokenizer, eval_set)
            t_eval += time.perf_counter() - t0
            print("  held-out " + "  ".join(f"{t} {a:.0%}" for t, a in scores.items()), flush=True)
    train_minutes = (time.perf_counter() - t_start - t_eval) / 60
    final_loss = float(np.mean(losses[-log_every:]))
    print(f"trained {step} steps ({drawn} chats drawn) in {train_minutes:.1f} min "
          f"(+{t_eval / 60:.1f} min of evaluation); final loss {final_loss:.4f}", flush=True)

    save_original(model, config, out)
    check_saved(model, out, tokenizer)
    # Every chat any stage of training drew: (data seed, chats drawn) per stage.
    stages = [] if init_from is None else training_stages(Path(init_from))
    stages.append({"data_seed": data_seed, "chats": drawn, "weights": weights, "multi_turn": multi_turn})
    seen = seen_in_training(stages)
    unseen = data.heldout(50, data.EVAL_SEED, exclude=seen)
    scores = score_examples(model, tokenizer, unseen)
    print("final, 50 unseen chats per task, in memory fp32: " + "  ".join(f"{t} {a:.0%}" for t, a in scores.items()))
    shipped = score_examples(load_model(out, dtype=mx.float32), tokenizer, unseen)
    print("final, 50 unseen chats per task, saved bf16 weights: " + "  ".join(f"{t} {a:.0%}" for t, a in shipped.items()))
    info = {
        "seed": seed, "steps": step, "chats_drawn": drawn, "data_stages": stages,
        "init_from": None if init_from is None else json.loads((Path(init_from) / "training.json").read_text()),
        "tokens_per_batch": tokens_per_batch, "lr": lr,
        "train_minutes": round(train_minutes, 1), "final_loss": round(final_loss, 4), "params": n_params,
        "heldout_accuracy_unseen_50": shipped,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def training_stages(folder: Path) -> list[dict]:
    """The chat streams of every training stage behind a saved demo model (a first model's
    training.json has no stages: one stage of the default stream)."""
    info = json.loads((folder / "training.json").read_text())
    return info.get("data_stages") or [{"data_seed": data.TRAIN_SEED, "chats": info["chats_drawn"],
                                        "weights": data.TASK_WEIGHTS, "multi_turn": 0.0}]


def seen_in_training(stages: list[dict]) -> set[str]:
    """Every user prompt the stages drew (replayed from their seeded streams)."""
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
    parser.add_argument("--minutes", type=float, default=90, help="safety cap; --steps ends a normal run")
    parser.add_argument("--steps", type=int, default=1700, help="steps (the LR schedule's length)")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (padding included)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--init-from", type=Path, default=None, help="continue training this saved demo model")
    parser.add_argument("--data-seed", type=int, default=data.TRAIN_SEED, help="seed of the chat stream")
    parser.add_argument("--weights", nargs="*", default=[], metavar="TASK=W", help="task mix, e.g. count=3")
    parser.add_argument("--multi-turn", type=float, default=data.MULTI_TURN_RATE, help="share of 2-3 turn chats")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                        help="override config.json fields, e.g. moe_intermediate_size=64")
    a = parser.parse_args(argv)
    config = json.loads(json.dumps(DEMO_CONFIG))
    for item in a.set:
        key, value = item.split("=", 1)
        config[key] = json.loads(value)
    weights = dict(data.TASK_WEIGHTS)
    for item in a.weights:
        task, w = item.split("=", 1)
        if task not in weights:
            parser.error(f"--weights: unknown task {task!r}; tasks: {', '.join(weights)}")
        weights[task] = float(w)
    train(a.minutes, a.steps, a.out, a.lr, a.tokens, a.eval_every, a.log_every, config=config,
          init_from=a.init_from, data_seed=a.data_seed, weights=weights, multi_turn=a.multi_turn)


if __name__ == "__main__":
    main()
