"""From a path to the files of a checkpoint: config, index and shards, all inside one folder.

A folder is searched in the order the seed gives: ``model.safetensors.index.json`` (its
``weight_map``), then ``model.safetensors``, then ``pytorch_model.safetensors``, then
``model-*.safetensors`` in sorted order. A path to a ``.safetensors`` file is taken as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, HeaderError, where

__all__ = ["INDEX_NAME", "Checkpoint", "discover"]

INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.safetensors")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The files of one checkpoint; ``weight_map`` (tensor → shard path) when an index exists."""

    root: Path
    config: Path
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, Path] | None = None


def discover(path: str | Path) -> Checkpoint:
    """Find a checkpoint's files, or raise ``CheckpointError`` naming what is missing."""
    p = Path(path)
    if p.is_file():
        return Checkpoint(p.parent, p.parent / "config.json", (p,))
    if not p.is_dir():
        raise CheckpointError(f"{where(p)}No such file or directory")
    config = p / "config.json"
    index = p / INDEX_NAME
    if index.exists():
        weight_map = _read_index(index, p)
        files = tuple(sorted(set(weight_map.values())))
        return Checkpoint(p, config, files, index, weight_map)
    for name in _SINGLE_NAMES:
        f = p / name
        if f.exists():
            if not f.is_file():
                raise CheckpointError(f"{where(f)}is not a regular file")
            return Checkpoint(p, config, (f,))
    shards = tuple(f for f in sorted(p.glob("model-*.safetensors")) if f.is_file())
    if not shards:
        raise CheckpointError(f"{where(p)}No safetensors file found")
    return Checkpoint(p, config, shards)


def _read_index(index: Path, root: Path) -> dict[str, Path]:
    try:
        obj = json.loads(index.read_bytes())
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{where(index)}index is not valid JSON ({e})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise HeaderError(f"{where(index)}index has no weight_map of tensor name to shard file")
    real_root = root.resolve()
    shards: dict[str, Path] = {}
    for shard in set(weight_map.values()):
        if "\0" in shard:
            raise CheckpointError(f"{where(index)}shard name {shard!r} holds a NUL byte")
        f = root / shard
        # A shard must stay inside the folder, symlinks resolved: an index is untrusted input.
        if Path(shard).is_absolute() or not f.resolve().is_relative_to(real_root):
            raise CheckpointError(f"{where(index)}shard {shard!r} lies outside {root}")
        if not f.is_file():
            raise CheckpointError(f"{where(index)}names shard {shard!r}, which is missing")
        shards[shard] = f
    return {name: shards[shard] for name, shard in weight_map.items()}
