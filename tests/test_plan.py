"""The memory plan: parameter list against the model, byte counts against real caches and a
quantized model, and the released config's figures against sums written out by hand here."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from tiny import TINY_CONFIG, write_checkpoint
from typer.testing import CliRunner

from kimi_mlx.cli import app
from kimi_mlx import Model, ModelArgs, mla_layer
from kimi_mlx.cache import LatentCache
from kimi_mlx.errors import KimiError
from kimi_mlx.dtypes import FP32_PARAMS
from kimi_mlx.plan import (DEFAULT_PREFILL_STEP, ContextDoesNotFit, ContextTooLong, check_context_fits, latent_rows,
                           parameter_shapes, plan_for_path, plan_memory)

REAL = json.loads((Path(__file__).parent / "data" / "kimi_linear_48b_a3b_config.json").read_text())
GiB = 2**30
ROUTER_8BIT = {f"model.layers.{i}.mlp.gate": {"group_size": 64, "bits": 8} for i in range(1, 27)}


def _real(**changes):
    return {**json.loads(json.dumps(REAL)), **changes}


# ---- the parameter list is the model's

@pytest.mark.parametrize("config", [TINY_CONFIG, REAL], ids=["tiny", "real"])
def test_parameter_shapes_are_the_models(config):
    args = ModelArgs.from_dict(config)
    model = Model(args)  # lazy: the real model's parameters are never allocated
    expected = {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}
    assert {name: shape for name, (shape, _) in parameter_shapes(args).items()} == expected


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_weight_bytes_are_those_of_a_quantized_model(mode):
    """bf16 tiny model, FP32_PARAMS and the router gate in fp32, quantized as mlx-lm would: group 32 (so modules whose
    input is 16 or 8 wide stay bf16), the router 8-bit, one module switched off."""
    q = {"group_size": 32, "bits": 4, "mode": mode,
         "model.layers.1.mlp.gate": {"group_size": 32, "bits": 8}, "model.layers.0.mlp.up_proj": False}
    config = {**TINY_CONFIG, "dtype": "bfloat16", "quantization": q}
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(n, p if n.endswith(FP32_PARAMS) else p.astype(mx.bfloat16))
                        for n, p in tree_flatten(model.parameters())])

    def predicate(path, module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % 32 == 0

    nn.quantize(model, group_size=32, bits=4, mode=mode, class_predicate=predicate)
    # The router gate's float tensors (here the 8-bit gate's scales and biases) are held in fp32.
    model.load_weights([(n, p.astype(mx.float32)) for n, p in tree_flatten(model.parameters())
                        if ".mlp.gate." in n and mx.issubdtype(p.dtype, mx.floating)], strict=False)
    params = tree_flatten(model.parameters())
    assert any(".mlp.gate.scales" in n and p.dtype == mx.float32 for n, p in params)
    assert any(n.endswith(".scales") for n, _ in params) and any(p.dtype == mx.bfloat16 for _, p in params)
    plan = plan_memory(config, 100, memory_bytes=GiB, backend="gpu")  # experts kept bf16 here, as on a GPU
    assert plan.weights == sum(p.nbytes for _, p in params)
    assert plan.parameters == sum(p.size for _, p in tree_flatten(Model(ModelArgs.from_dict(config)).parameters()))


# ---- caches: the plan's bytes are what the runtime allocates

@pytest.mark.parametrize("appends", [[5], [300, 300, 1], [256] * 9 + [1] * 70, [700], [512] * 5 + [1] * 600],
                         ids=["5", "300x2+1", "256x9+1x70", "700", "512x5+1x600"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_latent_rows_and_bytes_are_those_of_latent_cache(monkeypatch, appends, bits):
    monkeypatch.setattr(LatentCache, "page_size", 1024)  # small pages, same rule
    cache = LatentCache(bits)
    for n in appends:
        cache.update(mx.zeros((1, n, 576), dtype=mx.bfloat16))
    rows = sum(p[0].shape[1] for p in cache.pages) + cache.tail[0].shape[1]
    assert latent_rows(sum(appends), appends[0]) == rows
    config = {**TINY_CONFIG, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "dtype": "bfloat16"}
    plan = plan_memory(config, sum(appends), kv_bits=bits, prefill_step=appends[0], memory_bytes=GiB)
    assert plan.latent_cache == cache.nbytes  # the tiny config has one MLA layer


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_states_are_those_of_a_model_run(bits):
    model = Model(ModelArgs.from_dict(TINY_CONFIG))  # float32 weights, so float32 activations
    cache = model.make_cache(bits)  # the tiny latent (16 + 4 wide) is padded to one group of 64
    mx.eval(model(mx.array([[3, 4, 5, 6, 7]]), cache=cache))
    plan = plan_memory({**TINY_CONFIG, "dtype": "float32"}, 5, kv_bits=bits, prefill_step=5, memory_bytes=GiB)
    kda = [c for c, layer in zip(cache, model.layers) if layer.is_kda]
    assert plan.kda_states == sum(a.nbytes for c in kda for a in c.state)
    assert plan.latent_cache == sum(c.nbytes for c, layer in zip(cache, model.layers) if not layer.is_kda)


def test_activations_stop_growing_past_one_key_block():
    at = lambda context, step=512: plan_memory(REAL, context, prefill_step=step, memory_bytes=GiB).activations  # noqa: E731
    block = mla_layer._block_size(REAL["num_attention_heads"] * 512)  # keys of one block at 512 queries
    assert at(block) == at(1 << 20) > at(block // 2) > at(256)
    block = mla_layer._block_size(REAL["num_attention_heads"] * 2048)
    assert at(block, 2048) == at(1 << 20, 2048) > at(block // 2, 2048)
    # an estimate, but of the right size: a few copies of one block's scores (6.6x the block's
    # bytes measured in a whole prefill on the H200) and a few hundred MB
    assert 4 * mla_layer.SCORE_BLOCK_BYTES < at(1 << 20) < 8 * mla_layer.SCORE_BLOCK_BYTES


# ---- the released model's figures, summed by hand from the config numbers

def test_real_parameter_count_by_hand():
    c, lac = REAL, REAL["linear_attn_config"]
    h, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    H, D, K = lac["num_heads"], lac["head_dim"], lac["short_conv_kernel_size"]
    kda = 4 * h * H * D + 2 * (h * D + D * H * D) + h * H + 3 * H * D * K + H + H * D + D
    Hm, R, Dn, Dr, Dv = c["num_attention_heads"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    mla = h * Hm * (Dn + Dr) + h * (R + Dr) + R + Hm * R * (Dn + Dv) + Hm * Dv * h
    E, inter = c["num_experts"], c["moe_intermediate_size"]
    moe = 3 * E * h * inter + 3 * h * inter + E * h + E
    n_kda = len(lac["kda_layers"])
    total = 2 * V * h + n_kda * kda + (L - n_kda) * mla + 3 * h * c["intermediate_size"] + (L - 1) * moe + (2 * L + 1) * h
    plan = plan_memory(REAL, 1024, memory_bytes=GiB, backend="gpu")
    assert plan.parameters == total == 49_122_681_728
    fp32 = n_kda * (H + H * D) + (L - 1) * E  # A_log, dt_bias, router bias
    routers = (L - 1) * E * h  # the router gates: held in fp32 too (their float tensors)
    assert plan.weights == 2 * (total - fp32 - routers) + 4 * (fp32 + routers)  # bfloat16 checkpoint
    # On the CPU backend the routed experts are held in float32: 2 more bytes per expert weight.
    experts = (L - 1) * 3 * E * h * inter
    assert plan_memory(REAL, 1024, memory_bytes=GiB, backend="cpu").weights == plan.weights + 2 * experts

    # 4-bit g64 (9/16 byte per weight with bf16 scale and bias per 64), routers 8-bit with fp32
    # scale and bias (18/16): every quantizable module of this model has an input dim that is a multiple of 64.
    other = (2 * L + 1) * h + n_kda * (3 * H * D * K + D) + (L - n_kda) * R  # norms, conv weights
    quantized = total - other - fp32 - routers
    q4 = _real(quantization={"group_size": 64, "bits": 4, **ROUTER_8BIT})
    assert plan_memory(q4, 1024, memory_bytes=GiB, backend="gpu").weights == (
        quantized * 9 // 16 + routers * 18 // 16 + 2 * other + 4 * fp32)
    # CPU: the experts' scales and biases are float32 (the packed weights stay 4-bit): 4/64 more per weight
    assert plan_memory(q4, 1024, memory_bytes=GiB, backend="cpu").weights == (
        quantized * 9 // 16 + experts * 4 // 64 + routers * 18 // 16 + 2 * other + 4 * fp32)


def test_released_bf16_model_on_cpu_does_not_fit_128_gib():
    """The issue's case: the bf16 release planned for a 128 GiB machine. A GPU holds ~92 GiB; the
    CPU backend holds the experts in float32, ~180 GiB, so the plan must refuse it there."""
    gpu = plan_memory(REAL, 4096, memory_bytes=128 * GiB, backend="gpu")
    cpu = plan_memory(REAL, 4096, memory_bytes=128 * GiB, backend="cpu")
    assert gpu.fits and 90 * GiB < gpu.weights < 95 * GiB
    assert not cpu.fits and 170 * GiB < cpu.weights < 185 * GiB and "weights alone" in cpu.verdict()
    assert "held on the CPU backend" in cpu.format() and "routed experts in float32" in cpu.format()


def test_real_caches_by_hand():
    mib_tokens = 1 << 20  # 1,048,576 = 16 full pages: no unused rows
    plan = lambda bits: plan_memory(REAL, mib_tokens, kv_bits=bits, memory_bytes=GiB)  # noqa: E731
    assert plan(16).latent_cache == 7 * 576 * 2 * mib_tokens  # 8064 bytes per token
    assert plan(8).latent_cache == 7 * (576 + 9 * 4) * mib_tokens  # 9 groups: bf16 scale + bias
    assert plan(4).latent_cache == 7 * (288 + 9 * 4) * mib_tokens
    assert plan(16).kda_states == 20 * (32 * 128 * 128 * 4 + 3 * 3 * 4096 * 2)
    assert plan_memory(REAL, 1000, memory_bytes=GiB).latent_cache == 7 * 1024 * 576 * 2  # tail: 512 -> 1024 rows


# ---- limits and refusals

def test_context_past_the_maximum_is_refused():
    with pytest.raises(ContextTooLong, match="1,048,576"):
        plan_memory(REAL, 2_000_000, memory_bytes=GiB)
    no_limit = {k: v for k, v in REAL.items() if k != "model_max_length"}
    with pytest.raises(ContextTooLong):
        plan_memory(no_limit, 1_048_577, memory_bytes=GiB)
    with pytest.raises(KimiError, match="kv-bits"):
        plan_memory(REAL, 10, kv_bits=6, memory_bytes=GiB)


def test_check_context_fits_refuses_with_the_plan():
    args = ModelArgs.from_dict(_real(quantization={"group_size": 64, "bits": 4, **ROUTER_8BIT}))
    assert check_context_fits(args, 1 << 20, kv_bits=8, memory_bytes=128 * GiB).fits
    with pytest.raises(ContextDoesNotFit) as err:
        check_context_fits(args, 1 << 20, kv_bits=8, memory_bytes=16 * GiB)
    assert "ignore-memory-plan" in str(err.value)  # the refusal names the way past it
    message = str(err.value)
    assert "latent cache" in message and "does not fit" in message and "1,048,576" in message


def test_default_prefill_step_is_generations():
    from kimi_mlx.generate import DEFAULT_PREFILL_STEP as generate_step

    assert DEFAULT_PREFILL_STEP == generate_step


# ---- folders, the hub, the command line

def test_folder_with_only_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL))
    plan = plan_for_path(tmp_path, 131072, memory_bytes=128 * GiB, backend="gpu")
    assert plan.fits and plan.on_disk is None and "on disk" not in plan.format()
    tiny = write_checkpoint(tmp_path / "tiny")
    plan = plan_for_path(tiny, 64, memory_bytes=GiB)
    assert plan.on_disk == ((tiny / "model.safetensors").stat().st_size, 1) and "on disk" in plan.format()


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(KimiError, match="cannot be reached"):
        plan_for_path("someone/not-cached", 1024)


def test_cli_plan(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL))
    run = lambda *a: CliRunner().invoke(app, ["plan", "--model", str(tmp_path), *a])  # noqa: E731
    ok = run("--context", "131072", "--memory-gb", "128", "--backend", "gpu")
    assert ok.exit_code == 0, ok.output
    assert "latent cache" in ok.output and "fits:" in ok.output
    cpu = run("--context", "131072", "--memory-gb", "128", "--backend", "cpu")
    assert cpu.exit_code == 1 and "weights alone" in cpu.output
    small = run("--context", "131072", "--memory-gb", "64", "--kv-bits", "8")
    assert small.exit_code == 1 and "does not fit" in small.output and "weights alone" in small.output
    too_long = run("--context", "2000000", "--memory-gb", "128")
    assert too_long.exit_code == 2 and "maximum of 1,048,576" in too_long.output


@pytest.mark.parametrize("options, message", [
    (["--memory-gb", "-3"], "--memory-gb -3"), (["--memory-gb", "0"], "--memory-gb 0"),
    (["--memory-gb", "nan"], "--memory-gb nan"), (["--context", "0"], "context 0"),
    (["--context", "-5"], "context -5"), (["--batch", "0"], "batch 0"), (["--kv-bits", "6"], "--kv-bits 6"),
    (["--prefill-step", "0"], "prefill step 0"), (["--backend", "tpu"], "--backend tpu"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_plan_impossible_options_are_one_line_exit_2(options, message):
    args = ["plan", "--model", "demo", *(["--context", "100"] if "--context" not in options else []), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# ---- the plan counts what the loaded model holds, per backend

def _quantized_tiny(folder: Path) -> Path:
    """The tiny model in bfloat16 with 4-bit g32 experts and attention (mlx-lm's rule), written as a
    checkpoint: packed uint32 weights, bf16 scales and biases."""
    config = {**TINY_CONFIG, "dtype": "bfloat16", "quantization": {"group_size": 32, "bits": 4}}
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(n, p if n.endswith(FP32_PARAMS) else p.astype(mx.bfloat16))
                        for n, p in tree_flatten(model.parameters())])
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    return write_checkpoint(folder, config, dict(tree_flatten(model.parameters())))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("checkpoint", ["demo", "tiny-float32", "tiny-bf16-4bit"])
def test_plan_weights_are_the_loaded_models_bytes(tmp_path, monkeypatch, checkpoint, backend):
    """plan_for_path's weights == the sum of the parameters' nbytes after load_model, on each
    backend's rule. The GPU rule is loaded here on the CPU by telling the loader it is not the CPU
    backend (only which dtype each tensor is held in changes; no compute runs)."""
    from kimi_mlx import dtypes
    from kimi_mlx.loading import demo_model_path, load_model

    folder = {"demo": demo_model_path, "tiny-float32": lambda: write_checkpoint(tmp_path / "tiny"),
              "tiny-bf16-4bit": lambda: _quantized_tiny(tmp_path / "q")}[checkpoint]()
    real = dtypes.experts_fp32
    monkeypatch.setattr(dtypes, "experts_fp32", lambda cpu=None: (backend == "cpu") if cpu is None else real(cpu))
    held = sum(p.nbytes for _, p in tree_flatten(load_model(folder).parameters()))
    plan = plan_for_path(folder, 100, memory_bytes=GiB, backend=backend)
    assert plan.weights == held
    if checkpoint != "tiny-float32":  # config.json names the dtype: the config alone counts the same
        config = json.loads((folder / "config.json").read_text())
        assert plan_memory(config, 100, memory_bytes=GiB, backend=backend).weights == held


def test_demo_plan_on_cpu_counts_the_float32_experts():
    """The demo (v2, 6.5M parameters) holds 20.2 MiB on the CPU backend (float32 routed experts),
    12.4 MiB on a GPU (bf16 as stored, the router gates in fp32: 12.3 while they were bf16; the first
    demo: 7.1 and 4.5 MiB)."""
    cpu = plan_for_path("demo", 100, memory_bytes=GiB, backend="cpu")
    gpu = plan_for_path("demo", 100, memory_bytes=GiB, backend="gpu")
    assert round(cpu.weights / 2**20, 1) == 20.2 and round(gpu.weights / 2**20, 1) == 12.4


# ---- the refusal is an estimate: generate and chat can be told to run anyway

@pytest.fixture
def small_machine(monkeypatch):
    """This machine with 4 MiB of memory: the demo (7 MiB on CPU) does not fit by the plan."""
    import kimi_mlx.plan

    monkeypatch.setattr(kimi_mlx.plan, "machine_memory", lambda: (4 << 20, "physical memory"))


def test_generate_and_chat_refuse_by_the_plan_unless_told_to_ignore_it(small_machine):
    import kimi_mlx
    from kimi_mlx.chat import ChatSession

    model, tok = kimi_mlx.load("demo")
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    with pytest.raises(ContextDoesNotFit, match="ignore-memory-plan"):
        kimi_mlx.generate(model, tok, msgs, max_tokens=4)
    assert "42" in kimi_mlx.generate(model, tok, msgs, max_tokens=4, ignore_memory_plan=True)
    with pytest.raises(ContextDoesNotFit):
        ChatSession(model, tok, max_tokens=4).chat("What is 12 + 30?")
    assert "42" in ChatSession(model, tok, max_tokens=4, ignore_memory_plan=True).chat("What is 12 + 30?")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_ignore_memory_plan(small_machine, command):
    args = [command, "--max-tokens", "4"] + (["--prompt", "What is 12 + 30?"] if command == "generate" else [])
    stdin = None if command == "generate" else "What is 12 + 30?\n"
    refused = CliRunner().invoke(app, args, input=stdin)
    assert "do not fit in memory" in refused.output and "--ignore-memory-plan" in refused.output
    assert refused.exit_code == 2 or command == "chat"  # chat says it and keeps the session
    ran = CliRunner().invoke(app, [*args, "--ignore-memory-plan"], input=stdin)
    assert ran.exit_code == 0 and "42" in ran.stdout and "do not fit" not in ran.output, ran.output


def test_cli_cache_prompt_ignore_memory_plan(small_machine, tmp_path):
    args = ["cache-prompt", str(tmp_path / "p.safetensors"), "--prompt", "Remember: the key is 7."]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--ignore-memory-plan" in refused.output
    ran = CliRunner().invoke(app, [*args, "--ignore-memory-plan"])
    assert ran.exit_code == 0 and (tmp_path / "p.safetensors").exists(), ran.output


@pytest.mark.parametrize("kwargs", [dict(context=1.5), dict(context=True), dict(context="100"), dict(batch=0),
                                    dict(prefill_step=2.0), dict(memory_bytes=1.5e9), dict(memory_bytes=-1)])
def test_plan_api_refuses_impossible_values(kwargs):
    args = {"context": 100, "memory_bytes": GiB, **kwargs}
    with pytest.raises(KimiError) as e:
        plan_memory(TINY_CONFIG, **args)
    assert "\n" not in str(e.value)
