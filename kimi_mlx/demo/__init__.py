"""The embedded demo model: a tiny Kimi-Linear (the real architecture) trained here on checkable chat tasks.

- data.py: the seeded synthetic corpus (addition, copy, reverse, count, key-value recall).
- bpe.py: a small byte-level BPE in Kimi's tokenizer format (tiktoken.model + tokenizer_config.json).
- train.py: MLX training on the CPU; writes model/ in the original Hugging Face layout.
- checkpoint.py: MLX parameters -> Moonshot's original tensor names and shapes.
- evaluate.py: greedy decoding on held-out tasks; `python -m kimi_mlx.demo.evaluate`.
- model/: the shipped checkpoint (config.json, model.safetensors, tiktoken.model, tokenizer_config.json).
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
