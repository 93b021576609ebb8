"""One rank of the tests in test_parallel.py (started with MLX_RANK / MLX_HOSTFILE set).

    python tests/parallel_worker.py MODE FOLDER OUT.npz [die-after-load]
Loads FOLDER split by MODE, then writes (every rank) the logits of: a whole prompt without a
cache, the same prompt fed to a cache in two steps, and three decode steps after it.
"""

import os
import sys

import mlx.core as mx
import numpy as np

from kimi_mlx.parallel import join_world, load_sharded

PROMPT = [[(7 * i + 3) % 90 + 3 for i in range(37)], [(5 * i + 11) % 90 + 3 for i in range(37)]]  # [2, 37]
DECODE = [[4, 9], [17, 5], [60, 61]]


def main() -> None:
    mode, folder, out = sys.argv[1:4]
    group = join_world()
    model = load_sharded(folder, group, mode)
    if len(sys.argv) > 4 and group.rank() == 1:
        os._exit(3)  # a rank that dies: the others must stop with one line
    ids = mx.array(PROMPT)

    def call(x, cache=None):  # one call evaluated at a time, as generation does (see pipeline.py)
        out = model(x, cache=cache)
        mx.eval(out)
        return out

    whole = call(ids)  # [2, 37, V]
    cache = model.make_cache()
    first = call(ids[:, :20], cache)
    rest = call(ids[:, 20:], cache)
    steps = [call(mx.array(t)[:, None], cache) for t in DECODE]
    arrays = {"whole": whole, "stepped": mx.concatenate([first, rest], axis=1),
              "decode": mx.concatenate(steps, axis=1)}
    np.savez(out, **{k: np.array(v.astype(mx.float32)) for k, v in arrays.items()})


if __name__ == "__main__":
    main()
