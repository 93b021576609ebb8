"""One rank of the tests in test_parallel.py (started with MLX_RANK / MLX_HOSTFILE set).

    python tests/parallel_worker.py OUT_PREFIX MODE:FOLDER [MODE:FOLDER ...]
For each job: loads FOLDER split by MODE over the same group, then writes OUT_PREFIX-J-RANK.npz
with the logits of a whole prompt without a cache, of the same prompt fed to a cache in two
steps, and of three decode steps after it, the bytes of this rank's parameters, and how many
tensors it read as its row block alone (tensor mode), and 6 tokens sampled at temperature 1
from a different random seed on each rank.
"""

import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_lm.sample_utils import make_sampler

from kimi_mlx.generate import generate_tokens
from kimi_mlx.parallel import join_world, load_sharded
from kimi_mlx.parallel.load import READS

PROMPT = [[(7 * i + 3) % 90 + 3 for i in range(37)], [(5 * i + 11) % 90 + 3 for i in range(37)]]  # [2, 37]
SPLIT = 20  # the stepped prefill: 20 tokens, then 17 (>= 16: the experts' compact path on both)
DECODE = [[4, 9], [17, 5], [60, 61]]


def logits(model) -> dict:
    """The three cases above (the single-process reference runs this same function)."""
    ids = mx.array(PROMPT)

    def call(x, cache=None):  # one call evaluated at a time, as generation does (see parallel/pipeline.py)
        out = model(x, cache=cache)
        mx.eval(out)
        return out.astype(mx.float32)

    whole = call(ids)  # [2, 37, V]
    cache = model.make_cache()
    stepped = [call(ids[:, :SPLIT], cache), call(ids[:, SPLIT:], cache)]
    steps = [call(mx.array(t)[:, None], cache) for t in DECODE]
    return {"whole": np.array(whole), "stepped": np.array(mx.concatenate(stepped, axis=1)),
            "decode": np.array(mx.concatenate(steps, axis=1))}


def main() -> None:
    prefix, jobs = sys.argv[1], sys.argv[2:]
    group = join_world()
    for j, job in enumerate(jobs):
        mode, folder = job.split(":", 1)
        model = load_sharded(folder, group, mode)
        held = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        mx.random.seed(100 + group.rank())  # each rank its own random state: rank 0's samples must win
        sampled = [t for t, _ in generate_tokens(model, mx.array(PROMPT[0]), max_tokens=6, sampler=make_sampler(1.0))]
        np.savez(f"{prefix}-{j}-{group.rank()}.npz", param_bytes=held, row_blocks=READS["row blocks"],
                 sampled=np.array(sampled), **logits(model))


if __name__ == "__main__":
    main()
