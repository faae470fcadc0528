"""Llama structure checks against the config, and parameter and memory figures.

Works on the tensor table alone: no bytes are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import LlamaConfig
from .dtypes import DTYPES
from .format import TensorInfo

__all__ = [
    "LAYER_PARTS",
    "MemoryReport",
    "VerifyReport",
    "expected_shapes",
    "memory_report",
    "verify",
]

LAYER_PARTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What a checkpoint lacks, holds beyond a Llama's tensors, or holds in the wrong shape."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # name, expected, got
    complete_layers: int
    num_layers: int

    @property
    def ok(self) -> bool:
        """No tensor missing and none mis-shaped (unexpected extras are reported, not fatal)."""
        return not self.missing and not self.mismatched


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """Parameter count, bytes as float16 and as stored, and the largest tensors."""

    total_params: int
    float16_bytes: int
    stored_bytes: int
    stored_bytes_by_dtype: dict[str, int]
    tensor_count: int
    largest: tuple[tuple[str, int], ...]  # name, parameters


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama of ``config`` holds, with its shape (lm_head unless tied)."""
    h, hd = config.hidden_size, config.head_dim
    q, kv, inter = (
        config.num_attention_heads * hd,
        config.num_key_value_heads * hd,
        config.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    part_shapes = dict(
        zip(
            LAYER_PARTS,
            [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter), (h,), (h,)],
            strict=True,
        )
    )
    for i in range(config.num_hidden_layers):
        for part, shape in part_shapes.items():
            shapes[f"model.layers.{i}.{part}"] = shape
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def verify(config: LlamaConfig, tensors: Mapping[str, TensorInfo]) -> VerifyReport:
    """Compare the tensor table with what ``config`` says a Llama holds."""
    expected = expected_shapes(config)
    missing = tuple(n for n in expected if n not in tensors)
    # A tied checkpoint may still store lm_head (a copy of the embedding): not unexpected.
    allowed = set(expected) | {"lm_head.weight"}
    unexpected = tuple(n for n in tensors if n not in allowed)
    mismatched = tuple(
        (n, shape, tensors[n].shape)
        for n, shape in expected.items()
        if n in tensors and tensors[n].shape != shape
    )
    if "lm_head.weight" in tensors and "lm_head.weight" not in expected:
        shape = (config.vocab_size, config.hidden_size)
        if tensors["lm_head.weight"].shape != shape:
            mismatched += (("lm_head.weight", shape, tensors["lm_head.weight"].shape),)
    bad = {n for n in missing} | {n for n, _, _ in mismatched}
    complete = sum(
        all(f"model.layers.{i}.{p}" not in bad for p in LAYER_PARTS)
        for i in range(config.num_hidden_layers)
    )
    return VerifyReport(missing, unexpected, mismatched, complete, config.num_hidden_layers)


def memory_report(tensors: Mapping[str, TensorInfo], largest: int = 5) -> MemoryReport:
    """Figures of the tensor table: parameters, bytes as float16 and as stored per dtype."""
    by_dtype: dict[str, int] = {}
    for info in tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    params = sum(i.numel for i in tensors.values())
    floats = sum(i.numel for i in tensors.values() if DTYPES[i.dtype].is_float)
    others = sum(i.nbytes for i in tensors.values() if not DTYPES[i.dtype].is_float)
    # Stable sort: among equal sizes, file order (embed_tokens before lm_head, as the seed shows).
    top = sorted(tensors.values(), key=lambda i: -i.numel)[:largest]
    return MemoryReport(
        total_params=params,
        float16_bytes=floats * 2 + others,
        stored_bytes=sum(by_dtype.values()),
        stored_bytes_by_dtype=by_dtype,
        tensor_count=len(tensors),
        largest=tuple((i.name, i.numel) for i in top),
    )
