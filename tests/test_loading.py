"""load_model on good and bad folders: every bad input is one clear line naming the file and tensor."""

import json

import mlx.core as mx
import numpy as np
import pytest
from tiny import TINY_CONFIG, random_weights, write_checkpoint

from kimi_mlx import ModelFormatError, load_model
from kimi_mlx.errors import KimiError


@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def tokens():
    return mx.array(np.random.default_rng(0).integers(3, 96, size=(1, 9)).astype(np.int32))


def test_single_file_and_sharded_load_the_same(tmp_path, weights, tokens):
    a = load_model(write_checkpoint(tmp_path / "one", weights=weights))
    b = load_model(write_checkpoint(tmp_path / "three", weights=weights, shards=3))
    assert mx.array_equal(a(tokens), b(tokens))


def test_dtype_casts_weights_but_keeps_gates_fp32(tmp_path, weights):
    m = load_model(write_checkpoint(tmp_path / "m", weights=weights), dtype=mx.bfloat16)
    layer = m.layers[0].self_attn
    assert layer.q_proj.weight.dtype == mx.bfloat16
    assert layer.A_log.dtype == mx.float32 and layer.dt_bias.dtype == mx.float32
    assert m.layers[1].mlp.e_score_correction_bias.dtype == mx.float32


def test_other_model_type_is_refused(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "m", config={**TINY_CONFIG, "model_type": "llama"}, weights=weights)
    with pytest.raises(ModelFormatError, match=r"config\.json: model_type is 'llama'"):
        load_model(folder)


def test_missing_tensor_is_named(tmp_path, weights):
    w = dict(weights)
    del w["model.layers.0.self_attn.b_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"model\.layers\.0\.self_attn\.b_proj\.weight is missing"):
        load_model(write_checkpoint(tmp_path / "m", weights=w))


def test_extra_tensor_is_named_with_its_file(tmp_path, weights):
    w = {**weights, "model.layers.0.self_attn.surprise.weight": mx.zeros((2, 2))}
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.surprise"):
        load_model(write_checkpoint(tmp_path / "m", weights=w))


def test_wrong_shape_is_named(tmp_path, weights):
    w = {**weights, "model.norm.weight": mx.ones((31,))}
    with pytest.raises(ModelFormatError, match=r"model\.norm\.weight has shape \(31,\), config\.json implies \(32,\)"):
        load_model(write_checkpoint(tmp_path / "m", weights=w))


def test_truncated_safetensors_is_named(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "m", weights=weights, shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFormatError, match=r"model-00002-of-00002\.safetensors: truncated"):
        load_model(folder)


def test_garbage_safetensors_is_named(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "m", weights=weights)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(folder)


def test_missing_shard_listed_in_index(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "m", weights=weights, shards=2)
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"model-00001-of-00002\.safetensors: listed in model\.safetensors\.index\.json but missing"):
        load_model(folder)


def test_missing_config_and_bad_json(tmp_path, weights):
    folder = write_checkpoint(tmp_path / "m", weights=weights)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"config\.json: not valid JSON"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match=r"config\.json: not found"):
        load_model(folder)


def test_no_such_folder(tmp_path):
    with pytest.raises(KimiError, match="no such model folder"):
        load_model(tmp_path / "nowhere" / "deeper")


def test_quantized_checkpoint_loads_and_stays_close(tmp_path, weights, tokens):
    """A folder quantized the mlx-lm way (config `quantization` block + .scales/.biases) loads."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from kimi_mlx import Model, ModelArgs

    model = Model(ModelArgs.from_dict(TINY_CONFIG))
    model.load_weights(list(weights.items()))
    q = {"group_size": 32, "bits": 8, "model.layers.1.mlp.gate": False}
    nn.quantize(model, group_size=32, bits=8,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and p != "model.layers.1.mlp.gate"
                and m.weight.shape[-1] % 32 == 0)
    folder = tmp_path / "q"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps({**TINY_CONFIG, "quantization": q}))
    loaded = load_model(folder)
    assert isinstance(loaded.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(loaded.layers[1].mlp.gate, nn.Linear)  # the per-module override was honoured
    assert mx.array_equal(loaded(tokens), model(tokens))
