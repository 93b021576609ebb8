"""Train the demo model and score it, all within one wall-clock budget (one call on a lent GPU).

    KIMI_DEMO_T0=$(date +%s) python -m kimi_mlx.demo.run_device --out $OUT --budget 550 [train options]

1. kimi_mlx.demo.train with --steps 0: the schedule's length is set from the measured step time
   so that training ends by the deadline minus what scoring needs (--reserve seconds).
2. The model (original layout, bf16) and training.json go to OUT/model/.
3. Greedy accuracy of the saved weights (read back in fp32) on --n held-out chats per task and on
   retrieval at 1x, 4x and 16x the longest training prompt, with greedy_batch; then the same for
   the model converted to 4-bit (uniform, mixed) and mxfp4, while time is left.
Results go to OUT/eval.json after every stage (a run cut short keeps what it finished); the log is
OUT/log.txt. OUT holds at most 7 files, 2 folders deep (the device tool's limits).
KIMI_DEMO_T0 (epoch seconds) is when the call began, so installing counts against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

T0 = float(os.environ.get("KIMI_DEMO_T0", time.time()))


class Tee:
    """Print to the console and to OUT/log.txt."""

    def __init__(self, path: Path):
        self.file, self.console = open(path, "a", buffering=1), sys.stdout

    def write(self, text):
        self.console.write(text)
        self.file.write(text)

    def flush(self):
        self.console.flush()
        self.file.flush()


def gpu_name() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except Exception:  # noqa: BLE001 (no nvidia-smi: not a CUDA machine)
        return None


def convert_variant(src: Path, dst: Path, variant: str) -> Path:
    """`kimi-mlx convert src dst --bits 4 [--recipe mixed]` or `--q-mode mxfp4`, as a user runs it."""
    from kimi_mlx.convert import ConvertOptions, convert_checkpoint

    options = ConvertOptions(mode="mxfp4") if variant == "mxfp4" else ConvertOptions(bits=4, recipe=variant)
    convert_checkpoint(src, dst, options, force=True, log=lambda _: None)
    return dst


def left() -> float:
    return T0 + ARGS.budget - time.time()


def main(argv=None) -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=550, help="seconds from KIMI_DEMO_T0 to the end")
    parser.add_argument("--reserve", type=float, default=170, help="seconds kept for saving and scoring")
    parser.add_argument("--n", type=int, default=400, help="held-out chats per task")
    parser.add_argument("--n-retrieval", type=int, default=200, help="retrieval chats per length")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kimi-demo-work"))
    ARGS, train_argv = parser.parse_known_args(argv)
    out = ARGS.out
    (out / "model").mkdir(parents=True, exist_ok=True)
    sys.stdout = sys.stderr = Tee(out / "log.txt")
    print(f"started {time.time() - T0:.0f} s after the call began; budget {ARGS.budget:.0f} s", flush=True)

    import mlx.core as mx

    from ..loading import load_model
    from ..tokenizer import load_tokenizer
    from . import data, train
    from .evaluate import score_batched, score_retrieval

    results: dict = {"gpu": gpu_name(), "mlx": mx.__version__, "device": str(mx.default_device())}

    def dump():
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")

    dump()
    work = ARGS.work / "model"
    minutes = (left() - ARGS.reserve) / 60
    argv_train = ["--out", str(work), "--steps", "0", "--minutes", f"{minutes:.2f}", "--final-eval", "0",
                  *train_argv]
    print(f"training for at most {minutes:.2f} min: {' '.join(argv_train)}", flush=True)
    train.main(argv_train)
    info = json.loads((work / "training.json").read_text())
    info["device"]["gpu"] = results["gpu"]
    info["driver"] = ["python", "-m", "kimi_mlx.demo.run_device", *(sys.argv[1:] if argv is None else argv)]
    (work / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    for name in ("config.json", "model.safetensors", "tiktoken.model", "tokenizer_config.json", "training.json"):
        (out / "model" / name).write_bytes((work / name).read_bytes())
    results["training"] = {k: info[k] for k in ("steps", "schedule_steps", "train_minutes", "step_ms_median",
                                                 "final_loss", "params", "tokens_per_batch")}
    dump()
    print(f"saved; {left():.0f} s left", flush=True)

    from ..kda import set_kda_path

    set_kda_path("chunked")  # any T, any backend
    tokenizer = load_tokenizer(work)
    chats = data.heldout(ARGS.n, data.EVAL_SEED, split=True)
    variants = [("bf16", None), ("4bit-uniform", "uniform"), ("4bit-mixed", "mixed"), ("mxfp4", "mxfp4")]
    cost = {"chats": 20.0, "retrieval": 20.0}  # seconds; replaced by the bf16 model's own times
    for name, variant in variants:
        if left() < 1.3 * cost["chats"] + 5:
            print(f"skipping {name}: {left():.0f} s left", flush=True)
            continue
        t = time.time()
        try:
            folder = work if variant is None else convert_variant(work, ARGS.work / name, variant)
            model = load_model(folder, dtype=mx.float32) if variant is None else load_model(folder)
            scores = score_batched(model, tokenizer, chats)
            entry = {"chats_per_task": ARGS.n, "accuracy": scores}
            results.setdefault("variants", {})[name] = entry
            dump()
            print(f"{name}: " + "  ".join(f"{k} {v:.1%}" for k, v in scores.items())
                  + f"  ({time.time() - t:.0f} s)", flush=True)
            if variant is None:
                cost["chats"] = time.time() - t
            if left() > 1.3 * cost["retrieval"] + 5:
                t = time.time()
                entry["retrieval"] = score_retrieval(model, tokenizer, ARGS.n_retrieval)
                if variant is None:
                    cost["retrieval"] = time.time() - t
                dump()
                print(f"{name} retrieval: " + "  ".join(f"{k} ({r['tokens']} tokens) {r['accuracy']:.1%}"
                                                        for k, r in entry["retrieval"].items())
                      + f"  ({time.time() - t:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 (one variant failing must not lose the others)
            results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            dump()
            traceback.print_exc()
    print(f"done {time.time() - T0:.0f} s after the call began", flush=True)
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main()
