"""A small safetensors writer, for the demo checkpoint and for tests.

Writes header then data, tensors in the order given, the header padded with spaces so the data
starts on an 8-byte boundary, as the reference writer does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from .dtypes import DTYPES

__all__ = ["dtype_name", "save_file"]

_BY_NUMPY = {d.numpy: name for name, d in DTYPES.items() if d.numpy is not None}


def dtype_name(dtype: np.dtype[np.generic]) -> str:
    """The safetensors dtype string of a numpy (or ml_dtypes) dtype."""
    name = _BY_NUMPY.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise TypeError(f"no safetensors dtype for {dtype}")
    return name


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (little-endian, C order) to a safetensors file at ``path``."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = {name: np.asarray(a, order="C") for name, a in tensors.items()}
    for name, a in arrays.items():
        header[name] = {
            "dtype": dtype_name(a.dtype),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def save_checkpoint(
    tensors: Mapping[str, np.ndarray],
    outdir: str | os.PathLike[str],
    config: Mapping[str, object],
    max_shard_bytes: int,
) -> list[str]:
    """Write ``config.json`` and shards of at most ``max_shard_bytes`` (a larger tensor gets a
    shard of its own) with ``model.safetensors.index.json``, as sharded checkpoints are laid
    out. Returns the shard file names."""
    out = os.fspath(outdir)
    os.makedirs(out, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(out, fname), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2)
    return names
