"""Write a synthetic, Llama-shaped safetensors checkpoint for benchmarks.

The checkpoint has the tensor names, shapes, shard split, ``config.json`` and index file that
``transformers`` produces for the real model, filled with random BF16 weights (~N(0, 0.02), norm
weights near 1.0). Data is streamed to disk in chunks of a few MiB, so even the 16 GB Llama-3-8B
preset needs only a few tens of MiB of memory.

Usage::

    python bench/make_checkpoint.py PRESET OUTDIR [--seed N] [--order safetensors|state-dict]

Presets: ``llama3-8b`` (4 shards, 16,060,522,496 bytes), ``llama3-1b`` (Llama-3.2-1B shapes,
tied embeddings, one ``model.safetensors``), ``tiny`` (about 7.6 MB in 2 shards).

Shards are cut the way ``save_pretrained(max_shard_size=...)`` cuts them: tensors are taken in
``state_dict()`` order and a new shard starts when the next tensor would push the current one past
the limit (a tensor larger than the limit gets a shard of its own). Inside a shard the safetensors
writer lays tensors out sorted by name, and so does this script by default; ``--order state-dict``
keeps ``state_dict()`` order instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRESETS", "Preset", "TensorSpec", "make_checkpoint", "plan", "verify_checkpoint"]

BF16_BYTES = 2
# A pool of random BF16 values that every tensor chunk is cut from: generating normals costs far
# more than writing them, so each chunk is a random window of the pool with a cheap bit twist.
POOL_ELEMS = 8 << 20  # 16 MiB
CHUNK_ELEMS = 4 << 20  # 8 MiB per write
WEIGHT_STD = 0.02
NORM_STD = 0.02


@dataclass(frozen=True, slots=True)
class Preset:
    """Shapes of one model family member plus the extra ``config.json`` fields it carries."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_shard_size: int
    config_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the checkpoint: name, shape, and whether it is an RMSNorm weight."""

    name: str
    shape: tuple[int, ...]
    is_norm: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BF16_BYTES


_LLAMA3_COMMON: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_cache": True,
}

PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_shard_size=5 * 10**9,
        config_extra={
            **_LLAMA3_COMMON,
            "max_position_embeddings": 8192,
            "rope_scaling": None,
            "transformers_version": "4.40.0.dev0",
        },
    ),
    "llama3-1b": Preset(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_shard_size=5 * 10**9,
        config_extra={
            **_LLAMA3_COMMON,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "transformers_version": "4.45.0.dev0",
        },
    ),
    "tiny": Preset(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=False,
        max_shard_size=5 * 10**6,
        config_extra={
            **_LLAMA3_COMMON,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": 32,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "rope_scaling": None,
        },
    ),
}


def tensor_specs(p: Preset) -> list[TensorSpec]:
    """The tensors of ``LlamaForCausalLM.state_dict()`` in its order (tied lm_head left out)."""
    h, i, d = p.hidden_size, p.intermediate_size, p.head_dim
    q_out, kv_out = p.num_attention_heads * d, p.num_key_value_heads * d
    specs = [TensorSpec("model.embed_tokens.weight", (p.vocab_size, h), False)]
    for layer in range(p.num_hidden_layers):
        pre = f"model.layers.{layer}."
        specs += [
            TensorSpec(pre + "self_attn.q_proj.weight", (q_out, h), False),
            TensorSpec(pre + "self_attn.k_proj.weight", (kv_out, h), False),
            TensorSpec(pre + "self_attn.v_proj.weight", (kv_out, h), False),
            TensorSpec(pre + "self_attn.o_proj.weight", (h, q_out), False),
            TensorSpec(pre + "mlp.gate_proj.weight", (i, h), False),
            TensorSpec(pre + "mlp.up_proj.weight", (i, h), False),
            TensorSpec(pre + "mlp.down_proj.weight", (h, i), False),
            TensorSpec(pre + "input_layernorm.weight", (h,), True),
            TensorSpec(pre + "post_attention_layernorm.weight", (h,), True),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), True))
    if not p.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (p.vocab_size, h), False))
    return specs


def split_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Cut ``specs`` into shards by the greedy rule that ``save_pretrained`` uses."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if spec.nbytes > max_shard_size:
            shards.append([spec])
            continue
        if size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def plan(preset: str, order: str = "safetensors") -> list[tuple[str, list[TensorSpec]]]:
    """Each file of the checkpoint with its tensors in on-disk order."""
    p = PRESETS[preset]
    shards = split_shards(tensor_specs(p), p.max_shard_size)
    if order == "safetensors":
        shards = [sorted(s, key=lambda t: t.name) for s in shards]
    elif order != "state-dict":
        raise ValueError(f"unknown order {order!r}")
    return list(zip(shard_filenames(len(shards)), shards, strict=True))


def build_header(specs: list[TensorSpec]) -> bytes:
    """The safetensors header (length prefix included), padded with spaces to 8-byte alignment."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": "BF16",
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def config_dict(p: Preset) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "model_type": "llama",
        "num_attention_heads": p.num_attention_heads,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "tie_word_embeddings": p.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "vocab_size": p.vocab_size,
        **p.config_extra,
    }
    return dict(sorted(cfg.items()))


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → BF16 bit patterns (uint16), rounding to nearest even. ``x`` must be finite."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def make_pool(seed: int) -> np.ndarray:
    """``POOL_ELEMS`` BF16 bit patterns of N(0, WEIGHT_STD), made a MiB-sized piece at a time."""
    rng = np.random.default_rng([seed, 0x9E37])
    pool = np.empty(POOL_ELEMS, dtype=np.uint16)
    piece = 1 << 20
    for start in range(0, POOL_ELEMS, piece):
        x = rng.standard_normal(piece, dtype=np.float32)
        x *= np.float32(WEIGHT_STD)
        pool[start : start + piece] = to_bf16_bits(x)
    return pool


def tensor_chunks(
    spec: TensorSpec, index: int, seed: int, pool: np.ndarray, buf: np.ndarray
) -> Iterator[np.ndarray]:
    """The BF16 bits of one tensor as consecutive chunks (views of ``buf``, valid until next)."""
    n_total = math.prod(spec.shape)
    if spec.is_norm:
        rng = np.random.default_rng([seed, index, 1 << 30])
        x = rng.standard_normal(n_total, dtype=np.float32)
        x *= np.float32(NORM_STD)
        x += np.float32(1.0)
        yield to_bf16_bits(x)
        return
    for chunk_no, start in enumerate(range(0, n_total, CHUNK_ELEMS)):
        n = min(CHUNK_ELEMS, n_total - start)
        rng = np.random.default_rng([seed, index, chunk_no])
        off = int(rng.integers(0, POOL_ELEMS - n + 1))
        # Flipping the sign and the low mantissa bits keeps the distribution and makes every
        # chunk differ from the window it was cut from.
        mask = int(rng.integers(0, 16)) | (int(rng.integers(0, 2)) << 15)
        out = buf[:n]
        np.bitwise_xor(pool[off : off + n], np.uint16(mask), out=out)
        yield out


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def make_checkpoint(
    preset: str, outdir: Path, seed: int = 0, order: str = "safetensors", quiet: bool = False
) -> Path:
    """Write the ``preset`` checkpoint into ``outdir`` (created if missing); return ``outdir``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = plan(preset, order)
    state_order = {s.name: k for k, s in enumerate(tensor_specs(p))}
    pool = make_pool(seed)
    buf = np.empty(CHUNK_ELEMS, dtype=np.uint16)
    t_start = time.perf_counter()
    total = 0
    for filename, specs in files:
        t0 = time.perf_counter()
        tmp = outdir / (filename + ".partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, build_header(specs))
            for spec in specs:
                for chunk in tensor_chunks(spec, state_order[spec.name], seed, pool, buf):
                    _write_all(fd, chunk.data)
        finally:
            os.close(fd)
        os.replace(tmp, outdir / filename)
        nbytes = sum(s.nbytes for s in specs)
        total += nbytes
        if not quiet:
            dt = time.perf_counter() - t0
            print(
                f"{filename}: {len(specs)} tensors, {nbytes:,} bytes, "
                f"{nbytes / max(dt, 1e-9) / 1e6:.0f} MB/s",
                file=sys.stderr,
            )
    if len(files) > 1:
        weight_map = {s.name: filename for filename, specs in files for s in specs}
        index = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (outdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (outdir / "config.json").write_text(json.dumps(config_dict(p), indent=2) + "\n")
    if not quiet:
        dt = time.perf_counter() - t_start
        print(
            f"wrote {total:,} bytes of tensor data to {outdir} in {dt:.1f} s "
            f"({total / max(dt, 1e-9) / 1e6:.0f} MB/s)",
            file=sys.stderr,
        )
    return outdir


def verify_checkpoint(preset: str, outdir: Path, full_model: bool | None = None) -> None:
    """Check ``outdir`` with independent readers: safetensors (torch), AutoConfig and, for small
    presets, ``LlamaForCausalLM.from_pretrained``. Raises AssertionError on any mismatch."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    p = PRESETS[preset]
    outdir = Path(outdir)
    files = plan(preset)
    expected = {s.name: s for _, specs in files for s in specs}
    index_path = outdir / "model.safetensors.index.json"
    if len(files) > 1:
        index = json.loads(index_path.read_text())
        total = sum(s.nbytes for s in expected.values())
        assert index["metadata"]["total_size"] == total, index["metadata"]
        assert set(index["weight_map"]) == set(expected)
    else:
        assert not index_path.exists()
    seen: set[str] = set()
    for filename, specs in files:
        with safe_open(str(outdir / filename), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {s.name for s in specs}, filename
            for spec in specs:
                sl = f.get_slice(spec.name)
                assert sl.get_dtype() == "BF16" and tuple(sl.get_shape()) == spec.shape, spec.name
                rows = sl[: min(spec.shape[0], 64)].to(torch.float32)
                assert torch.isfinite(rows).all(), spec.name
                if spec.is_norm:
                    assert abs(rows.mean().item() - 1.0) < 0.01, spec.name
                else:
                    assert abs(rows.std().item() - WEIGHT_STD) < 0.002, spec.name
                seen.add(spec.name)
    assert seen == set(expected)
    cfg = AutoConfig.from_pretrained(outdir)
    assert cfg.model_type == "llama"
    assert cfg.hidden_size == p.hidden_size and cfg.num_hidden_layers == p.num_hidden_layers
    assert cfg.num_key_value_heads == p.num_key_value_heads and cfg.vocab_size == p.vocab_size
    assert bool(cfg.tie_word_embeddings) == p.tie_word_embeddings
    if full_model is None:
        full_model = sum(s.nbytes for s in expected.values()) < 100 * 10**6
    if full_model:
        from transformers import LlamaForCausalLM

        model, info = LlamaForCausalLM.from_pretrained(outdir, output_loading_info=True)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            assert not info.get(key), (key, info[key])
        with safe_open(str(outdir / files[0][0]), framework="pt") as f:
            name = files[0][1][0].name
            want = f.get_tensor(name)
        got = model.state_dict()[name]
        assert torch.equal(got.to(want.dtype), want), name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--order",
        choices=["safetensors", "state-dict"],
        default="safetensors",
        help="tensor order inside each shard (default: sorted by name, as safetensors writes)",
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="afterwards check the files with safetensors and transformers",
    )
    args = ap.parse_args(argv)
    make_checkpoint(args.preset, args.outdir, seed=args.seed, order=args.order)
    if args.verify:
        verify_checkpoint(args.preset, args.outdir)
        print("verify: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
