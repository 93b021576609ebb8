"""serve(): load a model, start the engine thread, run uvicorn until SIGINT / SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits for the open ones (streams in flight
finish), then the app's shutdown drains the engine and stops its thread.

Under mlx.launch every rank loads its share of the model; rank 0 serves HTTP and runs the
engine as leader, the others run the same engine turns without HTTP (kimi_mlx/server/lockstep.py)
and end when rank 0's engine stops. A lost rank ends the others with one line each.
"""

from __future__ import annotations

import contextlib
import logging

from ..errors import KimiError
from .app import ServerConfig, build_app
from .engine import Engine
from .lockstep import Lockstep, RankLockstep
from .state_cache import StateCache

log = logging.getLogger("kimi_mlx.server")


def make_engine(model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, prefill_step: int = 512,
                kv_bits: int | None = None, state_cache_mb: int = 2048, spill_dir: str | None = None,
                spill_mb: int = 8192, model_name: str = "this model", lockstep: Lockstep | None = None) -> Engine:
    """lockstep: under mlx.launch, this rank's RankLockstep (the state cache then agrees on sizes
    over its group and does not spill)."""
    state_cache = None
    group = getattr(lockstep, "group", None)
    if state_cache_mb > 0:
        state_cache = StateCache(state_cache_mb << 20, spill_dir, spill_mb << 20, model, model_name, group=group)
    return Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prefill_step=prefill_step,
                  kv_bits=kv_bits, state_cache=state_cache, lockstep=lockstep)


def check_serve_options(*, port, max_batch, max_queue, max_tokens, prefill_step, kv_bits, state_cache_mb,
                        spill_dir, spill_mb) -> None:
    """Refuse a serve option outside its range (a KimiError naming the flag) before the model
    loads: --port -1 was an OverflowError traceback from bind(), --max-batch 0 a server whose
    every request waited forever, a --spill-dir that is a file failed after the load."""
    def whole(value, low, high=None) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and value >= low
                and (high is None or value <= high))

    rules = [("--port", port, whole(port, 0, 65535), "0..65535 (0: any free port)"),
             ("--max-batch", max_batch, whole(max_batch, 1), "a whole number >= 1"),
             ("--max-queue", max_queue, whole(max_queue, 0), "a whole number >= 0"),
             ("--max-tokens", max_tokens, whole(max_tokens, 1), "a whole number >= 1"),
             ("--prefill-step", prefill_step, whole(prefill_step, 1), "a whole number >= 1"),
             ("--state-cache-mb", state_cache_mb, whole(state_cache_mb, 0), "a whole number >= 0 (0: off)"),
             ("--spill-mb", spill_mb, whole(spill_mb, 0), "a whole number >= 0")]
    for flag, value, ok, wanted in rules:
        if not ok:
            raise KimiError(f"{flag} {value}: must be {wanted}")
    if kv_bits not in (None, 16, 8, 4):
        raise KimiError(f"--kv-bits {kv_bits}: the latent cache takes 16, 8 or 4 bits")
    if spill_dir is not None:
        from pathlib import Path

        if not str(spill_dir).strip() or (Path(spill_dir).exists() and not Path(spill_dir).is_dir()):
            raise KimiError(f"--spill-dir {spill_dir!r}: not a folder; give a folder for the spilled snapshots")


def serve(model_path: str = "demo", host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, *,
          max_batch: int = 16, max_queue: int = 64, max_tokens: int = 512, prefill_step: int = 512,
          kv_bits: int | None = None, state_cache_mb: int = 2048, spill_dir: str | None = None,
          spill_mb: int = 8192, log_level: str = "info", ready=None) -> None:
    """Serve `model_path` (folder, hub repo id or 'demo') at http://host:port until stopped.
    ready: optional callable(port) once listening (tests)."""
    from .. import load
    from ..loading import resolve_model_path
    from ..parallel import launched

    check_serve_options(port=port, max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens,
                        prefill_step=prefill_step, kv_bits=kv_bits, state_cache_mb=state_cache_mb,
                        spill_dir=spill_dir, spill_mb=spill_mb)
    folder = resolve_model_path(model_path)
    model, tokenizer = load(str(folder))  # under mlx.launch: this rank's share (kimi_mlx.parallel)
    name = "demo" if model_path == "demo" else model_path
    lockstep = None
    if launched():
        lockstep = RankLockstep(model.group)
        if spill_dir is not None and lockstep.rank == 0:
            log.warning("--spill-dir is not used under mlx.launch (each rank's snapshot files would differ); "
                        "the state cache stays in memory, the same on every rank")
        spill_dir = None
        # every rank runs its own copy of the command: the engines must be configured alike
        lockstep.agree_on(dict(max_batch=max_batch, prefill_step=prefill_step, kv_bits=kv_bits,
                               state_cache_mb=state_cache_mb))
    engine = make_engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prefill_step=prefill_step,
                         kv_bits=kv_bits, state_cache_mb=state_cache_mb, spill_dir=spill_dir, spill_mb=spill_mb,
                         model_name=name, lockstep=lockstep)
    if lockstep is not None and lockstep.follower:
        engine.follow()  # rank 0's engine turns, until it stops (or a RankError)
        return
    app = build_app(engine, ServerConfig(model_name=name, api_key=api_key, default_max_tokens=max_tokens,
                                         kv_bits=kv_bits))

    server = make_uvicorn(engine, app, host, port, log_level, ready)
    engine.on_fatal = lambda _error: setattr(server, "should_exit", True)  # under ranks: a lost rank
    try:
        server.run()
    except OSError as e:
        raise KimiError(f"cannot serve on {host}:{port} ({e.strerror or e})") from None
    if engine.fatal is not None:
        raise engine.fatal


def make_uvicorn(engine: Engine, app, host: str, port: int, log_level: str = "info", ready=None):
    """A uvicorn.Server for `app` whose startup starts the engine thread and whose shutdown
    drains it (after uvicorn has let the open connections finish)."""
    import uvicorn

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        if ready is not None:
            ready(port)
        yield
        engine.stop(drain=True, timeout=60)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60,
                            access_log=False)
    return uvicorn.Server(config)
