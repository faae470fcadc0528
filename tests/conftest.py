"""Fixtures shared by the tests: checkpoints written by the `safetensors` library's own writer
and by the project's, and an oracle that reads them with `safetensors` plus an ml_dtypes cast."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors

import lazyllama
from lazyllama.demo import DEMO_CONFIG, write_demo

# The reference library's dtype names (its writer) and strings (its header), kept apart from the
# project's own table so that the oracle shares no code with what it checks.
_SPEC_NAMES = {
    np.dtype(np.bool_): "bool",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.int64): "int64",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.complex64): "complex64",
    np.dtype(ml_dtypes.float8_e4m3fn): "float8_e4m3fn",
    np.dtype(ml_dtypes.float8_e5m2): "float8_e5m2",
    np.dtype(ml_dtypes.float8_e4m3fnuz): "float8_e4m3fnuz",
    np.dtype(ml_dtypes.float8_e5m2fnuz): "float8_e5m2fnuz",
    np.dtype(ml_dtypes.float8_e8m0fnu): "float8_e8m0fnu",
}
ORACLE_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}


def st_save(tensors: Mapping[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None):
    """Write with the `safetensors` library's own writer."""
    arrays = {k: np.ascontiguousarray(v) if v.ndim else v.copy() for k, v in tensors.items()}
    specs = {
        k: safetensors.TensorSpec(
            dtype=_SPEC_NAMES[a.dtype],
            shape=list(a.shape),
            data_ptr=a.ctypes.data,
            data_len=a.nbytes,
        )
        for k, a in arrays.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)
    return path


def st_save_sharded(
    tensors: Mapping[str, np.ndarray], outdir: Path, config: dict, shards: int
) -> list[str]:
    """Shards written by the `safetensors` writer, with an index of our making."""
    outdir.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    files = []
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        st_save(part, outdir / fname, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        files.append(fname)
    (outdir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (outdir / "config.json").write_text(json.dumps(config))
    return files


def oracle(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a file or folder in its stored dtype, as `safetensors` reads it."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        for name, t in safetensors.deserialize(f.read_bytes()):
            dtype = np.dtype(ORACLE_DTYPES[t["dtype"]]).newbyteorder("<")
            out[name] = np.frombuffer(bytes(t["data"]), dtype=dtype).reshape(t["shape"])
    return out


def oracle_f16(path: Path) -> dict[str, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore"):
        return {k: v.astype(np.float16) for k, v in oracle(path).items()}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shape, dtype and bytes (NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def llama_tensors(config: dict, dtype=ml_dtypes.bfloat16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of the Llama shapes ``config`` gives, in checkpoint order."""
    from lazyllama.config import parse_config
    from lazyllama.verify import expected_shapes

    rng = np.random.default_rng(seed)
    shapes = expected_shapes(parse_config(config, "config"))
    return {n: rng.standard_normal(s, dtype=np.float32).astype(dtype) for n, s in shapes.items()}


def small_config(**over) -> dict:
    cfg = dict(DEMO_CONFIG)
    cfg.update(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    cfg.update(over)
    return cfg


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    write_demo(d)
    return d


@pytest.fixture
def open_model() -> Iterator:
    """``lazyllama.open`` whose models are closed after the test."""
    models: list[lazyllama.LazyModel] = []

    def _open(*args, **kwargs):
        m = lazyllama.open(*args, **kwargs)
        models.append(m)
        return m

    yield _open
    for m in models:
        m.close()


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYLLAMA_DISABLE_PROGRESS_BARS", "1")


def rchar() -> int:
    """Bytes this process has read through read(2)-like calls, from the kernel's count."""
    with open(f"/proc/{os.getpid()}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")
