"""A checkpoint file that is not a complete safetensors file (truncated copy, interrupted download, corrupt header)
stops loading with an error naming the file, before SGLang reads any shard.

SGLang 0.5.17 opens the shards in its weight iterator after the model is built; safetensors refuses a truncated one
with a bare `SafetensorError: ... incomplete metadata, file not fully covered` that names no file (the control
below shows it). The plugin hooks DefaultModelLoader._prepare_weights, the call that lists the shards, and checks each
header against the file size (sglang_m3.loader.check_safetensors_file). The oracle for "well-formed" is the
safetensors format itself: a checkpoint written by safetensors' own save_file, split into two shards with an index
as the release is, passes and loads every parameter bit-equal through SGLang's own iterator.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.test_layers import sglang_env  # noqa: F401  (fixture; importing it also sets up SGLang on CPU)

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """The tiny flat fp32 checkpoint re-saved as two safetensors shards + model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    from sglang_m3.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("two_shards"), dtype="float32", flat=True)
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    for shard, part in zip(SHARDS, halves):
        save_file({n: tensors[n] for n in part}, str(ckpt / shard), metadata={"format": "pt"})
    weight_map = {n: shard for shard, part in zip(SHARDS, halves) for n in part}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ckpt, tensors


def broken(two_shards, tmp_path, edit):
    """A copy of the two-shard checkpoint with `edit(path of shard 2)` applied; returns (dir, shard 2's path)."""
    ckpt = shutil.copytree(two_shards[0], tmp_path / "ckpt")
    shard = ckpt / SHARDS[1]
    edit(shard)
    return ckpt, shard


def truncate_to(size_of):
    def edit(path):
        with open(path, "r+b") as f:
            f.truncate(size_of(path.stat().st_size, int.from_bytes(path.read_bytes()[:8], "little")))
    return edit


def prepare_weights(ckpt, monkeypatch):
    """What SGLang's DefaultModelLoader._get_weights_iterator asks first, through the plugin's hook (as a server
    serving M3 runs it): (folder, shard files, use_safetensors)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from sglang_m3 import plugin

    monkeypatch.setattr(plugin, "_m3_served", True)  # set by the ModelConfig hook in a server's scheduler
    original = getattr(DefaultModelLoader._prepare_weights, "__wrapped__", DefaultModelLoader._prepare_weights)
    return plugin._check_checkpoint_files(original, DefaultModelLoader(LoadConfig()), str(ckpt), None, False)


# cut: (new size from (size, header length)), what the message must say
TRUNCATIONS = {
    "in_tensor_data": (lambda size, n: size - 1000, "truncated"),
    "one_byte_short": (lambda size, n: size - 1, "truncated"),
    "inside_header": (lambda size, n: 8 + n // 2, "header length field"),
    "inside_length_field": (lambda size, n: 5, "8-byte header length"),
    "empty": (lambda size, n: 0, "8-byte header length"),
}


@pytest.mark.parametrize("case", list(TRUNCATIONS))
def test_truncated_shard_is_refused_naming_the_file(sglang_env, two_shards, tmp_path, monkeypatch, case):  # noqa: F811
    from sglang_m3.loader import CheckpointFileError

    cut, text = TRUNCATIONS[case]
    ckpt, shard = broken(two_shards, tmp_path, truncate_to(cut))
    with pytest.raises(CheckpointFileError) as info:
        prepare_weights(ckpt, monkeypatch)
    message = str(info.value)
    assert str(shard) in message and "truncated or corrupt" in message and text in message, message
    assert SHARDS[0] not in message, message


def test_truncation_reports_the_missing_bytes(sglang_env, two_shards, tmp_path):  # noqa: F811
    """The byte counts in the message come from the header (independently parsed here)."""
    from sglang_m3.loader import CheckpointFileError, check_safetensors_file

    ckpt, shard = broken(two_shards, tmp_path, truncate_to(lambda size, n: size - 777))
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    end = max(e["data_offsets"][1] for k, e in json.loads(raw[8: 8 + n]).items() if k != "__metadata__")
    with pytest.raises(CheckpointFileError, match=f"up to byte {8 + n + end}, 777 bytes past the end"):
        check_safetensors_file(shard)


def _garbage_header(path):
    raw = bytearray(path.read_bytes())
    raw[8:24] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def _appended(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


def _gap_in_offsets(path):
    """Header rewritten so that the first tensor starts 4 bytes in (data left as is, file length unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[first]["data_offsets"][0] += 4
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)[:n]
    assert json.loads(text) == header
    path.write_bytes(raw[:8] + text + raw[8 + n:])


@pytest.mark.parametrize("edit,text", [(_garbage_header, "is not a JSON object"),
                                       (_appended, "64 bytes after the last tensor"),
                                       (_gap_in_offsets, "do not tile the data")])
def test_corrupt_shard_is_refused_naming_the_file(sglang_env, two_shards, tmp_path, monkeypatch, edit, text):  # noqa: F811
    from sglang_m3.loader import CheckpointFileError

    ckpt, shard = broken(two_shards, tmp_path, edit)
    with pytest.raises(CheckpointFileError) as info:
        prepare_weights(ckpt, monkeypatch)
    assert str(shard) in str(info.value) and text in str(info.value), str(info.value)


def test_sglang_alone_does_not_name_the_truncated_file(sglang_env, two_shards, tmp_path):  # noqa: F811
    """Why the check exists: SGLang's own iterator over the same truncated shard fails without naming it."""
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator

    ckpt, shard = broken(two_shards, tmp_path, truncate_to(lambda size, n: size - 1000))
    with pytest.raises(Exception) as info:
        list(safetensors_weights_iterator([str(ckpt / s) for s in SHARDS]))
    assert SHARDS[1] not in str(info.value), str(info.value)


def test_well_formed_shards_pass_and_load_every_parameter(sglang_env, two_shards, monkeypatch):  # noqa: F811
    """Control: the intact two-shard checkpoint passes the check, and SGLang's iterator over the files it returns
    fills every parameter of the model with its checkpoint data (tests/test_loader.expected_parameter)."""
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator

    from tests.test_loader import build, expected_parameter

    ckpt, tensors = two_shards
    folder, files, use_safetensors = prepare_weights(ckpt, monkeypatch)
    assert use_safetensors and sorted(f.rpartition("/")[2] for f in files) == list(SHARDS)
    model = build({"config": ckpt / "config.json"})
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.load_weights(safetensors_weights_iterator(files))
    names = dict(model.named_parameters())
    for name, param in names.items():
        assert torch.equal(param.data, expected_parameter(name, tensors, "", names)), name


@pytest.mark.server
def test_server_with_a_truncated_shard_exits_naming_it(start_server, two_shards, tmp_path):
    """End to end: launch_server on the truncated checkpoint stops, and its log names the shard."""
    from tests.test_bad_input import launch_fails

    ckpt, shard = broken(two_shards, tmp_path, truncate_to(lambda size, n: size - 1000))
    log = launch_fails(start_server, ckpt)
    assert f"checkpoint file {shard}" in log and "is truncated" in log, log[-3000:]
