"""Every small file of a model folder, every way it can be wrong: one line, exit 2, never a traceback.

The files: config.json, model.safetensors.index.json, a safetensors shard, tiktoken.model,
tokenizer_config.json, chat_template.jinja. The ways: a folder of that name, bytes that are not
UTF-8, endless (a link to /dev/zero), JSON of the wrong kind (a list, a string, a number), a weight_map that is not an object
or maps a tensor to something that is not a shard file in the folder ('..', an absolute path, a
number). Each is tried through the library entry points that read it (load_model, load_tokenizer,
plan_for_path, the converter's open_source) and through the CLI (info, plan, generate).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import TINY_CONFIG, write_checkpoint
from typer.testing import CliRunner

from kimi_mlx import KimiError, load_model, load_tokenizer
from kimi_mlx.cli import app
from kimi_mlx.loading import demo_model_path
from kimi_mlx.plan import plan_for_path

DEMO = demo_model_path()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny checkpoint with the demo tokenizer (the vocabulary sizes agree), in two shards + index."""
    config = dict(TINY_CONFIG, vocab_size=928, bos_token_id=672, eos_token_id=674, pad_token_id=927)
    folder = write_checkpoint(tmp_path_factory.mktemp("good") / "m", config, shards=2)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)
    return folder


def damage(folder: Path, name: str, how: str) -> None:
    path = folder / name
    if how == "folder":
        path.unlink(missing_ok=True)
        path.mkdir()
    elif how == "dangling":  # a hub cache whose blob was never downloaded (or was cleaned)
        path.unlink(missing_ok=True)
        path.symlink_to(folder / "no-such-blob")
    elif how == "zero":  # endless: a link to /dev/zero was read until memory ran out
        path.unlink(missing_ok=True)
        path.symlink_to("/dev/zero")
    elif how == "not_utf8":
        path.write_bytes(b"\xff\xfe{\x00")
    else:  # JSON of the wrong kind, or a weight_map entry that leaves the folder
        path.write_text(how)


INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00002.safetensors"
CASES = [
    ("config.json", "folder"), ("config.json", "not_utf8"), ("config.json", "[1, 2]"), ("config.json", '"text"'),
    ("config.json", "7"), ("config.json", "[" * 100000),
    (INDEX, "folder"), (INDEX, "not_utf8"), (INDEX, "[]"), (INDEX, '{"weight_map": [1]}'),
    (INDEX, '{"weight_map": {"model.norm.weight": 5}}'),
    (INDEX, '{"weight_map": {"model.norm.weight": "../m/' + SHARD + '"}}'),
    (INDEX, '{"weight_map": {"model.norm.weight": "/etc/hostname"}}'),
    (SHARD, "folder"), (SHARD, "dangling"), ("config.json", "zero"), (INDEX, "zero"),
]
TOKENIZER_CASES = [("tiktoken.model", "folder"), ("tokenizer_config.json", "folder"),
                   ("tokenizer_config.json", "not_utf8"), ("tokenizer_config.json", "[]"),
                   ("chat_template.jinja", "folder"), ("chat_template.jinja", "not_utf8"),
                   ("tiktoken.model", "zero"), ("tokenizer_config.json", "zero"), ("chat_template.jinja", "zero")]


def one_line(message: str, name: str) -> None:
    assert "\n" not in message and name in message, message


@pytest.mark.parametrize("name,how", CASES)
def test_damaged_model_file_is_one_line_in_every_reader(good, tmp_path, name, how):
    from kimi_mlx.convert.source import open_source

    folder = shutil.copytree(good, tmp_path / "m")
    damage(folder, name, how)
    for read in (load_model, lambda f: plan_for_path(str(f), 100), open_source):
        with pytest.raises(KimiError) as e:
            read(folder)
        one_line(str(e.value), name)


@pytest.mark.parametrize("name,how", TOKENIZER_CASES)
def test_damaged_tokenizer_file_is_one_line(good, tmp_path, name, how):
    folder = shutil.copytree(good, tmp_path / "m")
    damage(folder, name, how)
    with pytest.raises(KimiError) as e:
        load_tokenizer(folder)
    one_line(str(e.value), name)


@pytest.mark.parametrize("token_id", [3_000_000_000, 2**63, 672 + (1 << 20)])
def test_an_added_token_id_far_past_the_vocabulary_is_one_line(good, tmp_path, token_id):
    """Every id from the BPE ranks to the largest added id gets a table entry: an id of 3e9 made
    the loader build billions of them (a hang, then memory); now refused, the largest allowed id
    (MAX_SPECIAL_TOKENS - 1 past the ranks) is not tried here, it is a million entries."""
    folder = shutil.copytree(good, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(token_id)] = {"content": "<|far|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(KimiError, match=f"has id {token_id}, more than 1048576 past the 672 BPE ranks") as e:
        load_tokenizer(folder)
    one_line(str(e.value), "tokenizer_config.json")


@pytest.mark.parametrize("command", [["info"], ["plan", "-c", "100"], ["generate", "-p", "hi", "-n", "2"]])
@pytest.mark.parametrize("name,how", [("config.json", "[1, 2]"), ("config.json", "folder"), (INDEX, "[]"),
                                      (SHARD, "folder"), ("tokenizer_config.json", "folder")])
def test_damaged_model_file_through_the_cli_exits_2(good, tmp_path, command, name, how):
    folder = shutil.copytree(good, tmp_path / "m")
    damage(folder, name, how)
    result = CliRunner().invoke(app, command + ["-m", str(folder)])
    if name == "tokenizer_config.json" and command[0] != "generate":
        assert result.exit_code == 0, result.output  # info and plan do not read the tokenizer
        return
    err = result.stderr.strip()
    assert result.exit_code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, result.output
    assert name in err and "Traceback" not in result.output


def test_a_dangling_weights_link_without_an_index_is_one_line(good, tmp_path):
    """One model.safetensors, no index, the link to its blob dangling (a hub cache cleaned under
    it): the size check read it outside its error handling, a FileNotFoundError traceback."""
    folder = shutil.copytree(good, tmp_path / "m")
    for p in [folder / INDEX, *folder.glob("*.safetensors")]:
        p.unlink()
    damage(folder, "model.safetensors", "dangling")
    for read in (load_model, lambda f: plan_for_path(str(f), 100), open_source_of):
        with pytest.raises(KimiError) as e:
            read(folder)
        one_line(str(e.value), "model.safetensors")
    result = CliRunner().invoke(app, ["info", "-m", str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def open_source_of(folder):
    from kimi_mlx.convert.source import open_source

    return open_source(folder)


def test_the_undamaged_folder_loads(good):
    """The fixture is sound: every failure above comes from the damage."""
    load_model(good)
    assert load_tokenizer(good).encode("hi")
    assert json.loads((good / INDEX).read_text())["weight_map"]
