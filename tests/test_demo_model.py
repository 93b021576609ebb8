"""The shipped demo model (kimi_mlx/demo/model): a tiny Kimi-Linear trained on checkable chat tasks.

It is the whole-pipeline check: the real architecture, the original checkpoint layout, Kimi's
tokenizer format, and greedy decoding with the cache must all be right for it to score.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx import load_model
from kimi_mlx.demo import data
from kimi_mlx.demo.evaluate import MODEL_DIR, greedy_reply, retrieval_fillers, score_examples, unseen_examples
from kimi_mlx.kda import KDA_PATHS, set_kda_path
from kimi_mlx.loading import check_safetensors
from kimi_mlx.tokenizer import load_tokenizer

MIN_ACCURACY = 0.96  # on the fixed 50-chat sample: at most 2 misses per task


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR, dtype=mx.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


@pytest.fixture
def kda_path():
    """Set a KDA path for one test; always restored to the default afterwards."""
    yield set_kda_path
    set_kda_path(None)


@pytest.fixture(scope="module")
def unseen():
    """Held-out chats the model never trained on (the held-out split of the prompt space)."""
    return unseen_examples(MODEL_DIR, 50)


def test_scores_on_heldout_tasks(model, tokenizer, unseen):
    # A fixed sample of 50 held-out chats per task (100% on every task, CPU, fp32): a regression
    # guard, not the model's true accuracy. On 400 held-out chats per task (greedy, the bf16 weights
    # read in fp32) the shipped model scores addition 99.8%, copy 100%, reverse 100%, count 99.2%,
    # recall 99.5% (on the H200, MLX's CUDA backend; on this CPU, 100 other held-out chats per task:
    # 100/100/100/100/98%).
    examples = unseen
    scores = score_examples(model, tokenizer, examples)
    assert set(scores) == set(data.TASKS)
    low = {task: acc for task, acc in scores.items() if acc < MIN_ACCURACY}
    assert not low, f"below {MIN_ACCURACY:.0%}: {low} (all: {scores})"


def test_greedy_identical_across_kda_paths(model, tokenizer, kda_path):
    # Recall prompts are longer than one 64-token chunk, so the chunked path carries state.
    examples = data.heldout(3, data.EVAL_SEED + 11)
    replies = {}
    for path in KDA_PATHS:
        kda_path(path)
        replies[path] = [greedy_reply(model, tokenizer, ex.messages)[1] for ex in examples]
    for path in KDA_PATHS[1:]:
        assert replies[path] == replies[KDA_PATHS[0]], f"{path} differs from {KDA_PATHS[0]}"


def test_checkpoint_is_in_the_original_layout():
    header = check_safetensors(MODEL_DIR / "model.safetensors")
    config = json.loads((MODEL_DIR / "config.json").read_text())
    lac = config["linear_attn_config"]
    H, D, K = lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]
    shapes = {name: tuple(v["shape"]) for name, v in header.items() if name != "__metadata__"}
    dtypes = {v["dtype"] for name, v in header.items() if name != "__metadata__"}
    assert dtypes == {"BF16", "F32"}
    kda = lac["kda_layers"][0] - 1
    mla = lac["full_attn_layers"][0] - 1
    assert shapes[f"model.layers.{kda}.self_attn.q_conv1d.weight"] == (H * D, 1, K)
    assert shapes[f"model.layers.{kda}.self_attn.A_log"] == (1, 1, H, 1)
    heads = config["num_attention_heads"]
    assert shapes[f"model.layers.{mla}.self_attn.kv_b_proj.weight"] == (
        heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), config["kv_lora_rank"])
    assert "model.layers.0.mlp.gate_proj.weight" in shapes
    last = config["num_hidden_layers"] - 1
    for e in range(config["num_experts"]):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.{last}.block_sparse_moe.experts.{e}.{w}.weight" in shapes
    assert f"model.layers.{last}.block_sparse_moe.gate.e_score_correction_bias" in shapes
    assert f"model.layers.{last}.block_sparse_moe.shared_experts.down_proj.weight" in shapes
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 25 * 2**20


def test_tokenizer_files_follow_kimi(tokenizer):
    n = tokenizer.num_base_tokens
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert tokenizer.vocab_size == config["vocab_size"] == n + 256
    assert tokenizer.bos_token_id == config["bos_token_id"] == n
    assert tokenizer.eos_token_id == config["eos_token_id"] == n + 2  # <|im_end|>
    assert tokenizer.pad_token_id == config["pad_token_id"] == n + 255
    ex = data.generate(5, seed=3)[4]
    text = tokenizer.apply_chat_template(ex.conversation(), add_generation_prompt=False, tokenize=False)
    assert text == data.chat_text(ex.conversation())
    digits = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in digits] == list("12345")


def test_data_is_deterministic_and_checkable():
    a, b = data.generate(50, seed=5), data.generate(50, seed=5)
    assert a == b and a != data.generate(50, seed=6)
    for ex in data.heldout(20, seed=7, tasks=("addition",)):
        x, y = ex.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert ex.answer == str(int(x) + int(y))
    for ex in data.heldout(20, seed=7, tasks=("reverse",)):
        assert ex.answer.split() == ex.prompt.split("\n")[1].split()[::-1]


def test_transformers_reads_the_shipped_checkpoint(reference_module, model):
    """The reference implementation loads the original-layout files and agrees with ours."""
    ids = [[(11 * i + 5) % 640 for i in range(40)]]
    want = reference_module.reference_logits(MODEL_DIR, ids)
    got = np.array(model(mx.array(ids)))
    assert np.abs(want - got).max() < 1e-3


MAX_KV8_DROP = 0.03  # --kv-bits 8 on recall
MAX_QUANTIZATION_DROP = 0.02  # issue 17: 4-bit (and mxfp4) within 2 points of full precision


def test_8bit_latent_cache_keeps_recall(model, tokenizer):
    """--kv-bits 8 on the task that reads the MLA latents from far back."""
    examples = data.heldout(50, data.EVAL_SEED + 9, tasks=("recall",))
    full = score_examples(model, tokenizer, examples)["recall"]
    assert full - score_examples(model, tokenizer, examples, kv_bits=8)["recall"] <= MAX_KV8_DROP


def test_retrieval_at_4x_the_training_length(model, tokenizer):
    """One fact at a random depth in a prompt 4x the longest retrieval prompt of training (~700
    tokens): the KDA state decays, the MLA layers must find it. 8 chats here, one miss allowed; on
    the CPU in fp32 the model scores 100% at 1x (100 chats), 4x (100) and 16x (2812 tokens, 50)."""
    tokens, filler = retrieval_fillers(tokenizer, (4,))[4]
    examples = data.heldout(8, data.EVAL_SEED + 3, tasks=("retrieval",), recall_filler=filler, split=True)
    assert score_examples(model, tokenizer, examples)["retrieval"] >= 7 / 8


QUANTIZED = {"uniform": {"bits": 4, "recipe": "uniform"}, "mixed": {"bits": 4, "recipe": "mixed"},
             "mxfp4": {"mode": "mxfp4"}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped checkpoint through the converter, as a user runs it: 4-bit uniform and mixed, mxfp4."""
    from kimi_mlx.convert import ConvertOptions, convert_checkpoint

    out = tmp_path_factory.mktemp("converted")
    folders = {}
    for name, options in QUANTIZED.items():
        folders[name] = out / name
        convert_checkpoint(MODEL_DIR, folders[name], ConvertOptions(**options), log=lambda _: None)
    return folders


@pytest.fixture(scope="module")
def quantization_sample(model, tokenizer):
    examples = data.heldout(40, data.EVAL_SEED + 5)
    return examples, score_examples(model, tokenizer, examples)


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_4bit_conversion_keeps_the_scores(tokenizer, converted, quantization_sample, name):
    examples, full = quantization_sample
    quant = score_examples(load_model(converted[name]), tokenizer, examples)
    mean = lambda s: sum(s.values()) / len(s)  # noqa: E731
    assert mean(full) - mean(quant) <= MAX_QUANTIZATION_DROP, f"full {full}, {name} {quant}"


def test_chat_answers_through_the_cli_with_piped_stdin():
    import subprocess
    import sys
    from pathlib import Path

    examples = [ex for ex in data.heldout(6, data.EVAL_SEED + 21, tasks=("addition", "reverse"))
                if len(ex.messages) == 1]  # no system turn: chat is started without --system
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    # one question per conversation (/reset between): the demo model was trained on one-turn chats
    stdin = "/reset\n".join(ex.prompt + "\n" for ex in examples if ex.task == "addition")
    done = subprocess.run([sys.executable, str(cli), "chat", "--max-tokens", "16"], input=stdin,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("[")]
    answers = [ex.answer for ex in examples if ex.task == "addition"]
    right = sum(a in r for a, r in zip(answers, replies))
    assert right >= 0.9 * len(answers), (replies, answers)
