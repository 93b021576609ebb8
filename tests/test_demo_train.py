"""The demo model's training pipeline (kimi_mlx.demo.train / batches / evaluate), at toy size on the CPU.

What is checked: the held-out split never reaches training; batches are a pure function of
(seed, pool) in the fixed shapes; the dense training experts equal the gather reference (values
and gradients); training resumed from a checkpoint equals training straight through; the
batched greedy decoder gives the cached decoder's replies; the retrieval task is well formed.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU

from kimi_mlx.demo import data
from kimi_mlx.demo.batches import BUCKETS, StreamSpec, encode, pool_batches
from kimi_mlx.demo.evaluate import MODEL_DIR, greedy_batch, greedy_reply, retrieval_fillers
from kimi_mlx.demo.train import V2_WEIGHTS, experts_dense
from kimi_mlx.experts import experts_gather
from kimi_mlx.tokenizer import load_tokenizer

FP32_REL = 1e-5  # fp32 relative error, ||out - ref|| / ||ref||

# A toy config in the real layer pattern (K K K M), small enough for a few CPU steps.
TOY = ["--set", "hidden_size=32", "intermediate_size=64", "moe_intermediate_size=16", "num_attention_heads=2",
       "num_key_value_heads=2", "kv_lora_rank=16", "num_hidden_layers=4",
       'linear_attn_config={"full_attn_layers": [4], "kda_layers": [1, 2, 3], "head_dim": 16, "num_heads": 2, '
       '"short_conv_kernel_size": 4}',
       "--tokens", "256", "--pool", "48", "--warmup", "2", "--final-eval", "0", "--checkpoint-minutes", "0",
       "--log-every", "1"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


def rel(a, b) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def test_heldout_split_never_reaches_training():
    chats = data.stream(3, V2_WEIGHTS, multi_turn=0.3, holdout=True)
    prompts = [ex.prompt for _ in range(3000) for ex in next(chats)]
    assert not any(data.is_heldout(p) for p in prompts)
    held = data.heldout(30, seed=11, tasks=data.TASKS + data.LONG_TASKS, split=True)
    assert all(data.is_heldout(ex.prompt) for ex in held)
    assert len({ex.prompt for ex in held}) == len(held)  # each prompt once
    # about 1 in HELDOUT_MOD of all prompts is held out (a split, not an empty set)
    free = [ex.prompt for ex in data.generate(5000, seed=0, tasks=("copy",))]
    share = sum(map(data.is_heldout, free)) / len(free)
    assert 0.07 < share < 0.13


def test_retrieval_examples_hold_one_fact():
    for ex in data.heldout(40, seed=5, tasks=("retrieval",), recall_filler=(0, 30)):
        key = ex.prompt.rsplit("What is the code for ", 1)[1].rstrip("?")
        assert ex.prompt.count(f"The code for {key} is {ex.answer}.") == 1
        assert sum(w.rstrip(".").isdigit() for w in ex.prompt.split()) == 1


def test_retrieval_lengths_scale(tokenizer):
    fillers = retrieval_fillers(tokenizer, (1, 4, 16))
    assert fillers[1][1] == (data.RETRIEVAL_FILLER[1],) * 2  # 1x is the longest training prompt
    assert fillers[4][0] == pytest.approx(4 * fillers[1][0], rel=0.01)
    assert fillers[4][1][0] < fillers[16][1][0]


def test_encode_is_the_chat_template(tokenizer):
    for chat in (next(s) for s in [data.stream(7, V2_WEIGHTS, 0.5)] for _ in range(60)):
        ids, is_reply = encode(tokenizer, chat)
        want = []
        for ex in chat:
            want += tokenizer.apply_chat_template(list(ex.messages), add_generation_prompt=True)
            want += tokenizer.encode(ex.answer) + [tokenizer.eos_token_id]
        assert ids == want
        assert tokenizer.decode([i for i, r in zip(ids, is_reply) if r]).replace("<|im_end|>", "|") == \
            "".join(ex.answer + "|" for ex in chat)


def test_batches_are_a_pure_function_of_seed_and_pool(tokenizer):
    spec = StreamSpec(seed=4, weights=V2_WEIGHTS, multi_turn=0.1, tokens_per_batch=1024, pool=64)
    a, dropped = pool_batches(tokenizer, spec, 3)
    b, _ = pool_batches(tokenizer, spec, 3)
    c, _ = pool_batches(tokenizer, spec, 4)
    assert all(all(np.array_equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])
    rows = 0
    for inputs, targets, mask in a:
        B, L = inputs.shape
        assert L in BUCKETS and B == 1024 // L
        real = inputs != tokenizer.pad_token_id
        assert np.array_equal(inputs[:, 1:][real[:, 1:]], targets[:, :-1][real[:, 1:]])  # shifted by one
        assert not mask[~real].any()  # no loss on padding
        rows += int((mask.sum(1) > 0).sum())
    assert rows + dropped == 64  # every chat of the pool is in one batch, or counted as dropped


def test_dense_experts_equal_gather():
    mx.random.seed(1)
    mlp = SwitchGLU(24, 40, 5)
    N, k = 131, 2  # >= 64 (gather sorts rows), not a multiple of anything
    x = mx.random.normal((N, 24))
    ids = mx.argsort(mx.random.uniform(shape=(N, 5)), axis=-1)[:, :k].astype(mx.int32)
    w = mx.random.uniform(shape=(N, k))
    assert rel(experts_dense(mlp, x, ids, w), experts_gather(mlp, x, ids, w)) < FP32_REL

    def grads(fn):
        def loss(params, x):
            mlp.update(params)
            return (fn(mlp, x, ids, w) ** 2).sum()
        return mx.grad(loss, argnums=(0, 1))(mlp.trainable_parameters(), x)

    (gp, gx), (rp, rx) = grads(experts_dense), grads(experts_gather)
    assert rel(gx, rx) < FP32_REL
    for (name, g), (_, r) in zip(tree_flatten(gp), tree_flatten(rp)):
        assert rel(g, r) < FP32_REL, name


def test_resume_equals_training_straight_through(tmp_path):
    from kimi_mlx.demo import train

    train.main(["--out", str(tmp_path / "a"), "--steps", "4", *TOY])
    train.main(["--out", str(tmp_path / "b"), "--steps", "4", "--stop-after", "2", *TOY])
    train.main(["--out", str(tmp_path / "b"), "--steps", "4", "--resume", str(tmp_path / "b" / "checkpoint"), *TOY])
    for name in ("weights", "optimizer"):
        a = mx.load(str(tmp_path / "a" / "checkpoint" / f"{name}.safetensors"))
        b = mx.load(str(tmp_path / "b" / "checkpoint" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert mx.array_equal(a[key], b[key]), (name, key)
    info = json.loads((tmp_path / "a" / "training.json").read_text())
    assert info["steps"] == 4 and info["heldout"] == "split" and info["device"]["backend"] == "cpu"
    assert info["command"][:3] == ["python", "-m", "kimi_mlx.demo.train"]


def test_batched_greedy_gives_the_cached_replies(tokenizer):
    from kimi_mlx import load_model

    model = load_model(MODEL_DIR, dtype=mx.float32)
    examples = data.heldout(2, data.EVAL_SEED + 13)
    want = [greedy_reply(model, tokenizer, ex.messages)[1] for ex in examples]
    assert greedy_batch(model, tokenizer, [ex.messages for ex in examples], batch=8) == want
