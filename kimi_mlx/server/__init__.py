"""`kimi-mlx serve`: an OpenAI-compatible HTTP server with continuous batching and a multi-turn
state cache. engine.py: the model thread; batch_cache.py: batched caches; state_cache.py:
snapshots by token prefix; app.py: the HTTP API (Starlette + uvicorn)."""
