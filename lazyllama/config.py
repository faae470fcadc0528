"""``config.json`` of a Llama-family checkpoint as a frozen dataclass.

Covers what Llama 3, 3.1 and 3.2 write: ``rope_theta`` at the top level or, as transformers 5
writes it, under ``rope_parameters``; ``head_dim`` derived when absent; the stored dtype under
``torch_dtype`` or ``dtype``. Keys it does not name are kept in ``extra``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HeaderError, where

__all__ = ["LlamaConfig", "load_config", "parse_config"]

_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """The shape and numerics of a Llama model; the fields the loader and forward pass need."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    model_type: str = "llama"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_KNOWN = {f.name for f in fields(LlamaConfig)} | {"dtype", "rope_parameters"}


def parse_config(obj: object, file: str) -> LlamaConfig:
    """Build a ``LlamaConfig`` from parsed JSON, naming ``file`` in every error."""
    if not isinstance(obj, dict):
        raise HeaderError(f"{where(file)}config is a JSON {type(obj).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise HeaderError(f"{where(file)}config lacks required fields: {', '.join(missing)}")
    ints = {}
    for k in (*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = obj.get(k)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise HeaderError(
                f"{where(file)}config field {k} must be a positive integer, got {v!r}"
            )
        ints[k] = v
    heads = ints["num_attention_heads"]
    head_dim = ints.get("head_dim", ints["hidden_size"] // heads)
    rope = obj.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}
    theta = obj.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = obj.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    eps = obj.get("rms_norm_eps", 1e-6)
    for k, v in (("rope_theta", theta), ("rms_norm_eps", eps)):
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise HeaderError(f"{where(file)}config field {k} must be a positive number, got {v!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise HeaderError(f"{where(file)}config field rope_scaling must be an object or null")
    dtype = obj.get("torch_dtype", obj.get("dtype"))
    return LlamaConfig(
        hidden_size=ints["hidden_size"],
        intermediate_size=ints["intermediate_size"],
        num_hidden_layers=ints["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=ints.get("num_key_value_heads", heads),
        head_dim=head_dim,
        vocab_size=ints["vocab_size"],
        model_type=str(obj.get("model_type", "llama")),
        max_position_embeddings=ints.get("max_position_embeddings", 2048),
        rms_norm_eps=float(eps),
        rope_theta=float(theta),  # type: ignore[arg-type]  # checked above
        rope_scaling=scaling,
        tie_word_embeddings=bool(obj.get("tie_word_embeddings", False)),
        torch_dtype=None if dtype is None else str(dtype),
        extra={k: v for k, v in obj.items() if k not in _KNOWN},
    )


def load_config(path: Path) -> LlamaConfig:
    """Read and parse ``config.json`` at ``path``."""
    if not path.is_file():
        raise CheckpointError(f"{where(path)}config.json not found")
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{where(path)}config.json is not valid JSON ({e})") from None
    return parse_config(obj, str(path))
