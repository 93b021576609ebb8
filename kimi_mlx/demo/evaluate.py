"""Score the demo model by greedy decoding on freshly generated held-out tasks.

    python -m kimi_mlx.demo.evaluate [--model kimi_mlx/demo/model] [--n 50] [--seed S] [--unseen]
        [--kda-path naive|chunked|mx_fast] [--filler-scale 2 8] [--dtype float32|bfloat16] [--kv-bits 8]

An answer counts only when the decoded reply equals the expected answer exactly. With --unseen,
prompts that training drew (training.json's chats_drawn, replayed from the seeded stream) are
skipped, so every scored prompt is new to the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

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


def score_model(folder_or_model, tokenizer=None, n_per_task: int = 20, seed: int = data.EVAL_SEED,
                tasks=data.TASKS, recall_filler: tuple[int, int] = data.RECALL_FILLER,
                exclude: set[str] | None = None, kv_bits: int | None = None) -> dict[str, float]:
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
    examples = data.heldout(n_per_task, seed, tasks, exclude=exclude, recall_filler=recall_filler)
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
    parser.add_argument("--unseen", action="store_true", help="skip prompts that training drew")
    parser.add_argument("--kv-bits", type=int, default=None, choices=[16, 8, 4], help="latent cache precision")
    parser.add_argument("--filler-scale", type=float, nargs="*", default=[2, 8],
                        help="also score recall at these multiples of the training context")
    args = parser.parse_args(argv)
    if args.kda_path:
        set_kda_path(args.kda_path)
    model = load_model(args.model, dtype=getattr(mx, args.dtype))
    tokenizer = load_tokenizer(args.model)
    exclude = None
    if args.unseen:
        from .train import seen_in_training, training_stages

        exclude = seen_in_training(training_stages(Path(args.model)))
    t0 = time.perf_counter()
    scores = score_model(model, tokenizer, args.n, args.seed, exclude=exclude, kv_bits=args.kv_bits)
    for task, acc in scores.items():
        print(f"{task:10s} {acc:6.1%}")
    print(f"recall prompts in training: {context_length(tokenizer, data.RECALL_FILLER):.0f} tokens on average")
    for scale in args.filler_scale:
        filler = filler_for_scale(tokenizer, scale)
        acc = score_model(model, tokenizer, args.n, args.seed + 1, tasks=("recall",), recall_filler=filler,
                          exclude=exclude, kv_bits=args.kv_bits)["recall"]
        print(f"recall at {scale:g}x context ({context_length(tokenizer, filler):.0f} tokens, "
              f"{filler[0]} filler sentences): {acc:6.1%}")
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
