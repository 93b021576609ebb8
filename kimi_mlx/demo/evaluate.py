"""Score the demo model by greedy decoding on freshly generated held-out tasks.

    python -m kimi_mlx.demo.evaluate [--model kimi_mlx/demo/model] [--n 50] [--seed S] [--unseen]
        [--kda-path naive|chunked|mx_fast] [--filler-scale 2 8] [--dtype float32|bfloat16] [--kv-bits 8]
        [--batched] [--retrieval 1 4 16]

An answer counts only when the decoded reply equals the expected answer exactly. With --unseen,
every scored prompt is new to the model: for a model trained with the held-out split
(training.json "heldout": "split") only split prompts are drawn; for the first demo model the
prompts training drew (replayed from its seeded streams) are skipped.
Two decoders give the same greedy replies up to rounding: `greedy_reply` (one chat, prefill then
the cache, as kimi-mlx generate runs) and `greedy_batch` (many chats at once, the whole sequence
recomputed per token without a cache: fast on a GPU, where a tiny model is launch-bound).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from ..errors import KimiError
from ..files import read_json_object
from ..kda import set_kda_path
from ..loading import load_model
from ..model import Model
from ..tokenizer import load_tokenizer
from . import data

MODEL_DIR = Path(__file__).parent / "model"


def greedy_reply(model: Model, tokenizer, messages, max_tokens: int = 24,
                 kv_bits: int | None = None) -> tuple[str, list[int]]:
    """Prefill the chat prompt (last_only), then one token at a time with the cache until <|im_end|>."""
    prompt = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    stop = tokenizer.eos_token_ids
    cache = model.make_cache(kv_bits)
    logits = model(mx.array([prompt]), cache=cache, last_only=True)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits[0, -1]).item())
        if token in stop:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return tokenizer.decode(out), out


def score_examples(model: Model, tokenizer, examples, kv_bits: int | None = None) -> dict[str, float]:
    """{task: fraction of exact answers} over the given examples (latent cache at kv_bits)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for ex in examples:
        reply, _ = greedy_reply(model, tokenizer, ex.messages, kv_bits=kv_bits)
        right[ex.task] = right.get(ex.task, 0) + (reply == ex.answer)
        total[ex.task] = total.get(ex.task, 0) + 1
    return {task: right[task] / total[task] for task in total}


def greedy_batch(model: Model, tokenizer, messages_list, max_tokens: int = 24, batch: int = 128,
                 ) -> list[list[int]]:
    """Greedy replies (token ids, without the stop token) for many chats, `batch` at a time.

    Prompts are right-padded with [PAD] (the model is causal: padding after a row never changes
    it) and each step reads the logits at each row's own last token; finished rows drop out.
    """
    prompts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True) for m in messages_list]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    stop, pad = tokenizer.eos_token_ids, tokenizer.pad_token_id
    replies: list[list[int]] = [[] for _ in prompts]
    for b0 in range(0, len(order), batch):
        active = order[b0:b0 + batch]
        for _ in range(max_tokens):
            seqs = [prompts[i] + replies[i] for i in active]
            L = max(len(s) for s in seqs)
            x = mx.array([s + [pad] * (L - len(s)) for s in seqs])  # [B, L]
            h = model.model(x)  # [B, L, hidden]
            last = h[mx.arange(len(seqs)), mx.array([len(s) - 1 for s in seqs])]  # [B, hidden]
            logits = (model.model.embed_tokens.as_linear(last) if model.args.tie_word_embeddings
                      else model.lm_head(last))
            tokens = mx.argmax(logits, axis=-1).tolist()
            still = []
            for i, t in zip(active, tokens):
                if t not in stop:
                    replies[i].append(t)
                    still.append(i)
            active = still
            if not active:
                break
    return replies


def score_batched(model: Model, tokenizer, examples, batch: int = 128) -> dict[str, float]:
    """score_examples through greedy_batch: {task: fraction of exact answers}."""
    replies = greedy_batch(model, tokenizer, [ex.messages for ex in examples], batch=batch)
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for ex, ids in zip(examples, replies):
        right[ex.task] = right.get(ex.task, 0) + (tokenizer.decode(ids) == ex.answer)
        total[ex.task] = total.get(ex.task, 0) + 1
    return {task: right[task] / total[task] for task in total}


def retrieval_length(tokenizer, filler: tuple[int, int], n: int = 200, seed: int = 0) -> float:
    """Mean prompt length in tokens of retrieval chats with `filler` sentences."""
    import random

    rng = random.Random(seed)
    return sum(len(tokenizer.apply_chat_template(list(data.make_example("retrieval", rng, filler).messages),
                                                 add_generation_prompt=True)) for _ in range(n)) / n


def retrieval_fillers(tokenizer, scales=(1, 4, 16)) -> dict[float, tuple[int, tuple[int, int]]]:
    """{scale: (target prompt tokens, filler sentences)}: prompts `scale` times the longest in
    training (RETRIEVAL_FILLER[1] sentences), on average, from the linear tokens-per-sentence fit."""
    top = data.RETRIEVAL_FILLER[1]
    train_len = retrieval_length(tokenizer, (top, top))
    fixed = retrieval_length(tokenizer, (0, 0))
    per_sentence = (train_len - fixed) / top
    return {s: (round(s * train_len), (n := max(0, round((s * train_len - fixed) / per_sentence)), n))
            for s in scales}


def score_retrieval(model: Model, tokenizer, n: int, scales=(1, 4, 16), seed: int = data.EVAL_SEED + 3,
                    split: bool = True, batch: int = 0) -> dict[str, dict]:
    """Retrieval accuracy per context scale (1x = the longest training prompt): {"4x": {"tokens",
    "filler_sentences", "accuracy"}}; prompts from the held-out split by default.

    batch 0: one chat at a time with the cache (greedy_reply, as generate runs); batch > 0:
    greedy_batch. (On MLX 0.32.4's CUDA backend, greedy_batch of 32 rows of ~700+ tokens failed in
    the MLA layer with "cudaGraphAddKernelNode ... invalid argument"; one row at a time is the
    path generation uses.)
    """
    out = {}
    for scale, (tokens, filler) in retrieval_fillers(tokenizer, scales).items():
        examples = data.heldout(n, seed, tasks=("retrieval",), recall_filler=filler, split=split)
        if batch:
            acc = score_batched(model, tokenizer, examples, batch=batch)["retrieval"]
        else:
            acc = score_examples(model, tokenizer, examples)["retrieval"]
        out[f"{scale:g}x"] = {"tokens": tokens, "filler_sentences": filler[0], "accuracy": acc}
    return out


def unseen_examples(folder: Path, n_per_task: int, seed: int = data.EVAL_SEED, tasks=data.TASKS):
    """Held-out chats that the model in `folder` never trained on (see the module docstring)."""
    info = json.loads((Path(folder) / "training.json").read_text())
    if info.get("heldout") == "split":
        return data.heldout(n_per_task, seed, tasks, split=True)
    from .train import seen_in_training, training_stages

    return data.heldout(n_per_task, seed, tasks, exclude=seen_in_training(training_stages(Path(folder))))


def score_model(folder_or_model, tokenizer=None, n_per_task: int = 20, seed: int = data.EVAL_SEED,
                tasks=data.TASKS, recall_filler: tuple[int, int] | None = None,
                exclude: set[str] | None = None, kv_bits: int | None = None, split: bool = False) -> dict[str, float]:
    """{task: accuracy} by greedy decoding on n_per_task fresh examples of each task.

    `folder_or_model` is a model folder (its tokenizer is read from it when `tokenizer` is None)
    or a Model (then pass the tokenizer).
    """
    if isinstance(folder_or_model, (str, Path)):
        folder = Path(folder_or_model)
        model = load_model(folder)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
    else:
        model = folder_or_model
        if tokenizer is None:
            raise ValueError("score_model: pass the tokenizer along with an in-memory model")
    examples = data.heldout(n_per_task, seed, tasks, exclude=exclude, recall_filler=recall_filler, split=split)
    return score_examples(model, tokenizer, examples, kv_bits)


def context_length(tokenizer, filler: tuple[int, int], n: int = 200, seed: int = 0) -> float:
    """Mean prompt length in tokens of recall examples with `filler` sentences."""
    import random

    rng = random.Random(seed)
    lengths = [
        len(tokenizer.apply_chat_template(list(data.make_example("recall", rng, filler).messages)))
        for _ in range(n)
    ]
    return sum(lengths) / n


def filler_for_scale(tokenizer, scale: float) -> tuple[int, int]:
    """Filler sentences that make recall prompts `scale` times as long as in training (on average).

    Prompt length is linear in the number of sentences: fixed part + per-sentence tokens.
    """
    fixed = context_length(tokenizer, (0, 0))
    per_sentence = (context_length(tokenizer, (10, 10)) - fixed) / 10
    target = scale * context_length(tokenizer, data.RECALL_FILLER)
    n = max(0, round((target - fixed) / per_sentence))
    return (n, n)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument("--n", type=int, default=50, help="examples per task")
    parser.add_argument("--seed", type=int, default=data.EVAL_SEED)
    parser.add_argument("--kda-path", default=None, choices=["naive", "chunked", "mx_fast"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--unseen", action="store_true", help="only prompts the model never trained on")
    parser.add_argument("--kv-bits", type=int, default=None, choices=[16, 8, 4], help="latent cache precision")
    parser.add_argument("--batched", action="store_true", help="greedy_batch (no cache; fast on a GPU)")
    parser.add_argument("--filler-scale", type=float, nargs="*", default=[2, 8],
                        help="also score recall at these multiples of the training context")
    parser.add_argument("--retrieval", type=float, nargs="*", default=[],
                        help="score retrieval at these multiples of the longest training prompt, e.g. 1 4 16")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n {args.n}: give at least 1 example per task")
    try:
        _evaluate(args)
    except KimiError as e:  # a bad --model: one line, as the CLI does (was a traceback)
        parser.exit(2, f"error: {e}\n")


def _evaluate(args) -> None:
    if args.kda_path:
        set_kda_path(args.kda_path)
    model = load_model(args.model, dtype=getattr(mx, args.dtype))
    tokenizer = load_tokenizer(args.model)

    def examples(n, seed, tasks=data.TASKS, recall_filler=None):
        if args.unseen:
            training = read_json_object(Path(args.model) / "training.json", "--unseen needs the demo's training record")
            if training.get("heldout") == "split":
                return data.heldout(n, seed, tasks, recall_filler=recall_filler, split=True)
            from .train import seen_in_training, training_stages

            exclude = seen_in_training(training_stages(Path(args.model)))
            return data.heldout(n, seed, tasks, exclude=exclude, recall_filler=recall_filler)
        return data.heldout(n, seed, tasks, recall_filler=recall_filler)

    def score(exs):
        return score_batched(model, tokenizer, exs) if args.batched else score_examples(
            model, tokenizer, exs, args.kv_bits)

    t0 = time.perf_counter()
    for task, acc in score(examples(args.n, args.seed)).items():
        print(f"{task:10s} {acc:6.1%}")
    print(f"recall prompts in training: {context_length(tokenizer, data.RECALL_FILLER):.0f} tokens on average")
    for scale in args.filler_scale:
        filler = filler_for_scale(tokenizer, scale)
        acc = score(examples(args.n, args.seed + 1, ("recall",), filler))["recall"]
        print(f"recall at {scale:g}x context ({context_length(tokenizer, filler):.0f} tokens, "
              f"{filler[0]} filler sentences): {acc:6.1%}")
    if args.retrieval:
        for name, r in score_retrieval(model, tokenizer, args.n, args.retrieval, split=args.unseen).items():
            print(f"retrieval at {name} the longest training prompt ({r['tokens']} tokens, "
                  f"{r['filler_sentences']} filler sentences): {r['accuracy']:6.1%}")
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
