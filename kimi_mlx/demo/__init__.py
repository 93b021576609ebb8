"""The embedded demo model: a tiny Kimi-Linear (the real architecture) trained here on checkable chat tasks.

- data.py: the seeded synthetic corpus (addition, copy, reverse, count, key-value recall; and
  long-context retrieval of one fact), and the fixed held-out split of the prompt space.
- bpe.py: a small byte-level BPE in Kimi's tokenizer format (tiktoken.model + tokenizer_config.json).
- batches.py: fixed-shape training batches, a pure function of (seed, pool); worker processes.
- train.py: MLX training on any device (CPU, Metal, CUDA), checkpoint and resume; writes model/
  in the original Hugging Face layout and training.json (command, seeds, device).
- run_device.py: train + score (full precision, 4-bit, mxfp4, retrieval per length) within one
  wall-clock budget: one call on a lent GPU.
- checkpoint.py: MLX parameters -> Moonshot's original tensor names and shapes.
- evaluate.py: greedy decoding on held-out tasks; `python -m kimi_mlx.demo.evaluate`.
- model/: the shipped checkpoint (config.json, model.safetensors, tiktoken.model, tokenizer_config.json).
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
