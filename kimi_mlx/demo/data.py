"""A synthetic chat corpus whose answers can be checked exactly: the demo model's tasks.

Five task types, each a one-turn chat in Kimi's format (an optional system turn first):
- addition: "What is 52 + 47?" -> "99"
- copy:     "Repeat the list:\nred fox sun" -> "red fox sun"
- reverse:  "Reverse the list:\nred fox sun" -> "sun fox red"
- count:    "How many times does fox appear in this list?\nred fox sun fox" -> "2"
- recall:   "Remember these codes: lion=48, rose=17. <filler sentences> What is the code for rose?" -> "17"
  The question comes long after the pairs (filler in between), so it needs the MLA layers.
And one long-context task, scored apart from the five chat tasks (per context length):
- retrieval: "<filler> The code for lion is 417. <filler> What is the code for lion?" -> "417"
  One fact at a random depth in 2..RETRIEVAL_FILLER[1] filler sentences; evaluated at 1x, 4x and
  16x the longest training prompt. The KDA layers' state is local (it decays); the MLA layers
  must find the fact.
Lists start on a new line so their first word is the same token as the reply's first word
(BPE merges a leading space into a word: " red" and "red" are different tokens).

Training chats have one turn, or with MULTI_TURN_RATE two or three turns of independent tasks
(so the model answers the latest question, as in `kimi-mlx chat`); evaluation is one-turn.
Everything is drawn from `random.Random(seed)`: the same seed gives the same examples.
Training uses TRAIN_SEED; evaluation draws from other seeds. Held-out prompts are kept out of
training by one of two rules: a replay of what training drew (`seen_prompts`, the first demo
model), or a fixed split of the prompt space (`is_heldout`: crc32 of the user prompt; training
streams made with holdout=True never draw such a prompt, evaluation draws only those).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

TASKS = ("addition", "copy", "reverse", "count", "recall")  # the chat tasks (scored on short chats)
LONG_TASKS = ("retrieval",)  # scored per context length (evaluate.score_retrieval)
TRAIN_SEED = 0
EVAL_SEED = 1_000_003

# Difficulty knobs (the trained model is measured against exactly these).
ADD_MAX = 99  # operands 0..ADD_MAX
COPY_LEN = (3, 6)  # distinct words in the list to repeat
REVERSE_LEN = (3, 5)
COUNT_LEN = (3, 6)  # list length; drawn from COUNT_POOL distinct words
COUNT_POOL = (2, 3)
RECALL_PAIRS = (2, 4)
RECALL_VALUES = (10, 99)  # two-digit codes
RECALL_FILLER = (1, 3)  # filler sentences between the pairs and the question, in training
SYSTEM_RATE = 0.15  # share of chats that open with a system turn
# Training mix: copying is learned first and fastest, arithmetic, counting and recall need the most.
TASK_WEIGHTS = {"addition": 2.5, "copy": 0.5, "reverse": 1.0, "count": 2.0, "recall": 2.0}
MULTI_TURN_RATE = 0.0  # share of training chats with 2 or 3 turns (0: the rng is not even asked)
RETRIEVAL_FILLER = (2, 16)  # filler sentences around the fact, in training
RETRIEVAL_VALUES = (100, 999)  # three-digit codes (recall's are two-digit)
HELDOUT_MOD = 10  # the split: a prompt is held out when crc32(prompt) % HELDOUT_MOD == 0

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Kimi, a small demo model.",
    "Answer with the result only.",
)

# One-syllable words: with a leading space each becomes one BPE token.
WORDS = (
    "red blue green gold pink gray black white "
    "cat dog fox owl cow pig bee ant bat elk "
    "sun moon star rain snow wind fog ice "
    "map cup pen box bag key hat bed "
    "tree leaf rock sand lake hill road door "
    "run jump sing swim walk read cook draw"
).split()
KEYS = (
    "lion rose bear wolf hawk crab frog deer duck goat "
    "mint sage corn rice plum pear lime kiwi fig oak"
).split()
FILLER_SUBJECTS = ("The old man", "A young girl", "The farmer", "My friend", "The teacher", "A small boy",
                   "The baker", "Her sister")
FILLER_VERBS = ("walked to", "looked at", "talked about", "thought of", "painted", "visited", "cleaned",
                "found")
FILLER_OBJECTS = ("the river", "the market", "a quiet street", "the garden", "an empty room", "the station",
                  "the village", "the harbor")
FILLER_TAILS = ("in the morning", "after lunch", "before dark", "with care", "once again", "for a while",
                "last week", "at noon")


@dataclass(frozen=True)
class Example:
    """One chat: `messages` (system?, user) and the exact expected assistant reply."""

    task: str
    messages: tuple[dict, ...] = field(hash=False)
    answer: str

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    def conversation(self) -> list[dict]:
        """The messages with the assistant reply appended (what training sees)."""
        return [*self.messages, {"role": "assistant", "content": self.answer}]


def chat_text(messages, add_generation_prompt: bool = False) -> str:
    """Kimi's chat format for plain turns (what the checkpoint's template renders)."""
    tags = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}
    text = "".join(f"{tags[m['role']]}{m['role']}<|im_middle|>{m['content']}<|im_end|>" for m in messages)
    return text + ("<|im_assistant|>assistant<|im_middle|>" if add_generation_prompt else "")


# ---------------------------------------------------------------- the tasks


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    return f"What is {a} + {b}?", str(a + b)


def copy(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(*COPY_LEN))
    return f"Repeat the list:\n{' '.join(words)}", " ".join(words)


def reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(*REVERSE_LEN))
    return f"Reverse the list:\n{' '.join(words)}", " ".join(reversed(words))


def count(rng: random.Random) -> tuple[str, str]:
    pool = rng.sample(WORDS, rng.randint(*COUNT_POOL))
    words = rng.choices(pool, k=rng.randint(*COUNT_LEN))
    target = rng.choice(words)
    return f"How many times does {target} appear in this list?\n{' '.join(words)}", str(words.count(target))


def filler_sentence(rng: random.Random) -> str:
    parts = (FILLER_SUBJECTS, FILLER_VERBS, FILLER_OBJECTS, FILLER_TAILS)
    return " ".join(rng.choice(p) for p in parts) + "."


def recall(rng: random.Random, filler: tuple[int, int] = RECALL_FILLER) -> tuple[str, str]:
    keys = rng.sample(KEYS, rng.randint(*RECALL_PAIRS))
    values = [str(rng.randint(*RECALL_VALUES)) for _ in keys]
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    story = " ".join(filler_sentence(rng) for _ in range(rng.randint(*filler)))
    i = rng.randrange(len(keys))
    return f"Remember these codes: {pairs}. {story} What is the code for {keys[i]}?", values[i]


def retrieval(rng: random.Random, filler: tuple[int, int] = RETRIEVAL_FILLER) -> tuple[str, str]:
    """One fact at a uniformly random sentence position (0 = first) among `filler` sentences."""
    n = rng.randint(*filler)
    key, value = rng.choice(KEYS), str(rng.randint(*RETRIEVAL_VALUES))
    sentences = [filler_sentence(rng) for _ in range(n)]
    sentences.insert(rng.randint(0, n), f"The code for {key} is {value}.")
    return f"{' '.join(sentences)} What is the code for {key}?", value


MAKERS = {"addition": addition, "copy": copy, "reverse": reverse, "count": count, "recall": recall,
          "retrieval": retrieval}


def make_example(task: str, rng: random.Random, recall_filler: tuple[int, int] | None = None) -> Example:
    """One chat of `task`; recall_filler overrides the filler range of recall / retrieval."""
    if task in ("recall", "retrieval"):
        default = RECALL_FILLER if task == "recall" else RETRIEVAL_FILLER
        question, answer = MAKERS[task](rng, recall_filler or default)
    else:
        question, answer = MAKERS[task](rng)
    messages = []
    if rng.random() < SYSTEM_RATE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": question})
    return Example(task, tuple(messages), answer)


def is_heldout(prompt: str) -> bool:
    """The fixed split of the prompt space: True for about 1 in HELDOUT_MOD user prompts."""
    return zlib.crc32(prompt.encode()) % HELDOUT_MOD == 0


def generate(n: int, seed: int, tasks=TASKS, recall_filler: tuple[int, int] | None = None) -> list[Example]:
    """n examples, tasks in turn (n // len(tasks) each, the rest to the first ones), from one seed."""
    rng = random.Random(seed)
    return [make_example(tasks[i % len(tasks)], rng, recall_filler) for i in range(n)]


def stream(seed: int = TRAIN_SEED, weights: dict[str, float] = TASK_WEIGHTS, multi_turn: float = MULTI_TURN_RATE,
           holdout: bool = False):
    """The endless training stream of chats, each a tuple of Examples (its turns; only the first
    may have a system message): tasks drawn at random with these weights, from one rng.
    holdout=True redraws any turn whose prompt `is_heldout` (the same rng, so still seeded)."""
    rng = random.Random(seed)
    tasks, w = list(weights), list(weights.values())

    def draw() -> Example:
        while True:
            ex = make_example(rng.choices(tasks, w)[0], rng)
            if not (holdout and is_heldout(ex.prompt)):
                return ex

    while True:
        turns = 1 if not multi_turn or rng.random() >= multi_turn else rng.randint(2, 3)
        chat = [draw() for _ in range(turns)]
        yield tuple([chat[0]] + [Example(e.task, e.messages[-1:], e.answer) for e in chat[1:]])


def seen_prompts(n: int, seed: int = TRAIN_SEED, weights: dict[str, float] = TASK_WEIGHTS,
                 multi_turn: float = MULTI_TURN_RATE) -> set[str]:
    """The user prompts of the first n chats of `stream(seed, weights, multi_turn)`: what training saw."""
    chats = stream(seed, weights, multi_turn)
    return {ex.prompt for _ in range(n) for ex in next(chats)}


def heldout(n_per_task: int, seed: int = EVAL_SEED, tasks=TASKS, exclude: set[str] | None = None,
            recall_filler: tuple[int, int] | None = None, split: bool = False) -> list[Example]:
    """n_per_task examples of each task whose prompt is not in `exclude` (e.g. the training prompts).

    split=True: only prompts that `is_heldout` (never drawn by a holdout=True stream), each
    prompt at most once per task (addition has 10^4 prompts, 10^3 of them held out).
    """
    rng = random.Random(seed)
    out = []
    for task in tasks:
        got, taken = 0, set()
        while got < n_per_task:
            ex = make_example(task, rng, recall_filler)
            if exclude is not None and ex.prompt in exclude:
                continue
            if split and (not is_heldout(ex.prompt) or ex.prompt in taken):
                continue
            taken.add(ex.prompt)
            out.append(ex)
            got += 1
    return out
