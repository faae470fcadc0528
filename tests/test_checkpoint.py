"""Discovery as the seed describes it, config parsing, sharded checkpoints against the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import lazyllama
from lazyllama import CheckpointError, HeaderError
from lazyllama.config import parse_config
from lazyllama.writer import save_checkpoint

from .conftest import llama_tensors, oracle_f16, same_bits, small_config, st_save, st_save_sharded


def one(tmp: Path, name: str, value: float) -> None:
    st_save({"x": np.full(2, value, np.float32)}, tmp / name)


def test_index_comes_first(tmp_path: Path, open_model) -> None:
    cfg = small_config()
    st_save_sharded(llama_tensors(cfg), tmp_path, cfg, shards=2)
    one(tmp_path, "model.safetensors", 1.0)  # present, but the index wins
    m = open_model(tmp_path)
    assert m.checkpoint.index == tmp_path / "model.safetensors.index.json"
    assert "x" not in m and len(m.checkpoint.files) == 2


def test_model_safetensors_before_pytorch_model(tmp_path: Path, open_model) -> None:
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    one(tmp_path, "pytorch_model.safetensors", 2.0)
    one(tmp_path, "model-00001-of-00001.safetensors", 3.0)
    assert open_model(tmp_path)["x"].load()[0] == 2.0
    one(tmp_path, "model.safetensors", 1.0)
    assert open_model(tmp_path)["x"].load()[0] == 1.0


def test_unindexed_shards_in_sorted_order(tmp_path: Path, open_model) -> None:
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    st_save({"b": np.ones(2, np.float32)}, tmp_path / "model-00002-of-00002.safetensors")
    st_save({"a": np.ones(3, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    m = open_model(tmp_path)
    assert [f.name for f in m.checkpoint.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert list(m) == ["a", "b"]


def test_direct_file_path_needs_no_config(tmp_path: Path, open_model) -> None:
    one(tmp_path, "weights.safetensors", 4.0)
    m = open_model(tmp_path / "weights.safetensors")
    assert m["x"].load()[0] == 4.0
    with pytest.raises(CheckpointError, match=r"config\.json not found") as info:
        m.config  # noqa: B018
    assert str(tmp_path) in str(info.value)


def test_missing_config(tmp_path: Path) -> None:
    one(tmp_path, "model.safetensors", 1.0)
    with pytest.raises(CheckpointError, match=r"config\.json not found") as info:
        lazyllama.open(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_no_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(small_config()))
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="No safetensors file found") as info:
        lazyllama.open(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        lazyllama.open(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_index_names_a_missing_shard(tmp_path: Path) -> None:
    cfg = small_config()
    files = st_save_sharded(llama_tensors(cfg), tmp_path, cfg, shards=2)
    (tmp_path / files[1]).unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        lazyllama.open(tmp_path)
    assert "model.safetensors.index.json" in str(info.value) and files[1] in str(info.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_shard_outside_the_folder(tmp_path: Path, shard: str) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    one(tmp_path, "outside.safetensors", 1.0)
    (d / "config.json").write_text(json.dumps(small_config()))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(CheckpointError, match="outside") as info:
        lazyllama.open(d)
    assert str(d / "model.safetensors.index.json") in str(info.value)


def test_index_entry_absent_from_its_shard(tmp_path: Path) -> None:
    cfg = small_config()
    files = st_save_sharded(llama_tensors(cfg), tmp_path, cfg, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.extra.weight"] = files[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks it") as info:
        lazyllama.open(tmp_path)
    assert "model.layers.9.extra.weight" in str(info.value)


@pytest.mark.parametrize("writer", ["safetensors", "lazyllama"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_sharded_checkpoint_equals_oracle(tmp_path: Path, open_model, writer: str, dtype) -> None:
    cfg = small_config()
    tensors = llama_tensors(cfg, dtype=dtype)
    if writer == "safetensors":
        st_save_sharded(tensors, tmp_path, cfg, shards=3)
    else:
        save_checkpoint(
            tensors, tmp_path, cfg, max_shard_bytes=sum(a.nbytes for a in tensors.values()) // 3
        )
    m = open_model(tmp_path)
    assert len(m.checkpoint.files) >= 3
    expected = oracle_f16(tmp_path)
    got = m.load()
    assert set(got) == set(expected) == set(tensors)
    for name, arr in got.items():
        assert same_bits(arr, expected[name]), name
    assert m.verify().ok


def test_demo_checkpoint_splits_a_layer_and_reads_right(demo_dir: Path, open_model) -> None:
    m = open_model(demo_dir)
    files_of_layer = {}
    for name, info in m.tensors.items():
        if name.startswith("model.layers."):
            files_of_layer.setdefault(int(name.split(".")[2]), set()).add(info.file)
    assert any(len(files) == 2 for files in files_of_layer.values())
    assert all(i.dtype == "BF16" for i in m.tensors.values())
    expected = oracle_f16(demo_dir)
    for name, arr in m.load().items():
        assert same_bits(arr, expected[name])


# -- config --------------------------------------------------------------------------------


def test_config_rope_theta_top_level_or_under_rope_parameters() -> None:
    base = small_config()
    base.pop("rope_theta")
    a = parse_config({**base, "rope_theta": 500000.0}, "c")
    b = parse_config(
        {**base, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, "c"
    )
    assert a.rope_theta == b.rope_theta == 500000.0
    assert b.rope_scaling == base["rope_scaling"]


def test_config_llama3_scaling_under_rope_parameters() -> None:
    base = small_config(rope_scaling=None)
    base.pop("rope_theta")
    rp = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    c = parse_config({**base, "rope_parameters": rp}, "c")
    assert c.rope_theta == 5e5
    assert c.rope_scaling == {k: v for k, v in rp.items() if k != "rope_theta"}


def test_config_head_dim_derived_and_dtype_names() -> None:
    base = small_config(torch_dtype=None)
    base.pop("head_dim")
    base.pop("torch_dtype")
    c = parse_config({**base, "dtype": "bfloat16", "something_else": 7}, "c")
    assert c.head_dim == base["hidden_size"] // base["num_attention_heads"]
    assert c.torch_dtype == "bfloat16"
    assert c.extra["something_else"] == 7
    assert parse_config({**base, "torch_dtype": "float16"}, "c").torch_dtype == "float16"


def test_config_kv_heads_default_to_heads() -> None:
    base = small_config()
    base.pop("num_key_value_heads")
    assert parse_config(base, "c").num_key_value_heads == base["num_attention_heads"]


def test_config_is_frozen() -> None:
    c = parse_config(small_config(), "c")
    with pytest.raises(AttributeError):
        c.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "change",
    [
        {"hidden_size": None},
        {"hidden_size": "64"},
        {"num_attention_heads": 0},
        {"rms_norm_eps": "x"},
    ],
)
def test_config_bad_fields(tmp_path: Path, change: dict) -> None:
    cfg = small_config()
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    st_save({"x": np.ones(1, np.float32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeaderError) as info:
        lazyllama.open(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
