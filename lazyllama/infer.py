"""Greedy Llama inference in numpy, streaming the decoder layers of a lazily loaded model.

Weights arrive as float16 and are widened to float32 one block of rows at a time, so the memory
used by the computation stays near one layer plus the KV cache, whatever the size of the model.
Each generated token costs exactly one pass over ``model.layers()``; the prompt rides in the first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import operator
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import ml_dtypes
import numpy as np
import numpy.typing as npt

from . import _sync

__all__ = ["agenerate", "generate", "logits", "stream_generate"]

F32 = npt.NDArray[np.float32]
Layer = Mapping[str, npt.NDArray[Any]]

# Elements of a weight read or widened to float32 at a time: 16 MiB of float16, so a 1 GB lm_head
# is never in memory, let alone in float32, as a whole.
_BLOCK_ELEMENTS = 1 << 23
# A few tokens at a time, a layer is bound by widening float16 to float32, fastest on blocks that
# stay in a core's cache; BLAS's own threads cost more than they give on such small products (far
# more when the cores are busy), so each product is kept under _SMALL_PRODUCT multiply-adds, which
# BLAS runs on one core, and the blocks are spread over a pool of threads. Many tokens at once make
# large products, left to BLAS in large blocks.
_SMALL_PRODUCT = 1 << 17
_FEW_TOKENS = 32

_BF16 = np.dtype(ml_dtypes.bfloat16)
_F16_FIELDS = np.int32(-0x70002000)  # 0x8FFFE000: sign, exponent and mantissa, shifted
_F16_REBIAS = np.float32(2.0**112)  # 2 ** (127 - 15)


class _Config(Protocol):
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_key_value_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def rms_norm_eps(self) -> float: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rope_scaling(self) -> Mapping[str, Any] | None: ...
    @property
    def tie_word_embeddings(self) -> bool: ...


class _Tensor(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...
    def load(self) -> npt.NDArray[Any]: ...
    def __getitem__(self, key: int | slice, /) -> npt.NDArray[Any]: ...


class Model(Protocol):
    """What inference needs of a model: the shape of ``lazyllama.LazyModel``."""

    @property
    def config(self) -> _Config: ...
    def __getitem__(self, name: str, /) -> _Tensor: ...
    def layers(self, prefetch: int = ...) -> Iterator[tuple[int, Layer]]: ...
    def alayers(self, prefetch: int = ...) -> AsyncIterator[tuple[int, Layer]]: ...


# --- rotary embeddings ------------------------------------------------------------------------


def rope_frequencies(config: _Config) -> npt.NDArray[np.float64]:
    """Inverse frequencies [D/2] of the rotary embedding, with ``rope_scaling`` applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (float(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def _rope_tables(inv_freq: npt.NDArray[np.float64], start: int, n: int) -> tuple[F32, F32]:
    angles = np.outer(np.arange(start, start + n, dtype=np.float64), inv_freq)  # [S, D/2]
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]  # [S, 1, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _apply_rope(x: F32, cos: F32, sin: F32) -> F32:
    # Halves convention of HF Llama ("rotate_half"), not interleaved pairs.
    half = x.shape[-1] // 2
    rotated: F32 = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [S, H, D]
    out: F32 = x * cos + rotated * sin
    return out


# --- building blocks --------------------------------------------------------------------------


def _rms_norm(x: F32, weight: npt.NDArray[Any], eps: float) -> F32:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))  # [S, 1]
    out: F32 = x * scale * weight.astype(np.float32)
    return out


def _silu(x: F32) -> F32:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: silu -> -0
        out: F32 = x / (1 + np.exp(-x))
    return out


def _pool() -> ThreadPoolExecutor:
    # The runtime's compute threads stop with the last open model, as its other threads do.
    return _sync.runtime().compute


def _widen(w: npt.NDArray[Any], scratch: npt.NDArray[np.int32]) -> F32:
    """``w.astype(float32)``, into ``scratch`` and several times faster for (b)float16.

    A bfloat16 is the top half of a float32: one shift. Shifted 13 bits left, a float16's
    exponent and mantissa land where a float32's go; multiplying by 2**112 then rebiases the
    exponent, subnormals included. Inf and NaN would come out finite, at least 65536 in
    magnitude, so a float16 block holding one is left to numpy's own cast.
    """
    if not w.flags.c_contiguous or w.dtype not in (np.float16, _BF16):
        return w.astype(np.float32)
    bits = scratch[: w.shape[0]]
    if w.dtype == _BF16:
        wide = bits.view(np.uint32)
        np.left_shift(w.view(np.uint16), 16, out=wide, dtype=np.uint32)
        return wide.view(np.float32)
    np.left_shift(w.view(np.int16), 13, out=bits, dtype=np.int32)  # sign-extended
    np.bitwise_and(bits, _F16_FIELDS, out=bits)
    f = bits.view(np.float32)
    np.multiply(f, _F16_REBIAS, out=f)
    if f.max() >= 65536 or f.min() <= -65536:
        return w.astype(np.float32)
    return f


def _rows_matmul(x: F32, w: npt.NDArray[Any], y: F32, start: int, step: int) -> None:
    # y[:, start + a] = x @ w[a].T for each row a of w, widening `step` rows at a time.
    scratch = np.empty((min(step, w.shape[0]), w.shape[1]), dtype=np.int32)
    for a in range(0, w.shape[0], step):
        block = _widen(w[a : a + step], scratch)  # [step, in]
        y[:, start + a : start + a + block.shape[0]] = x @ block.T


def _matmul(x: F32, w: npt.NDArray[Any], y: F32, start: int = 0) -> None:
    """``y[:, start:start + len(w)] = x @ w.T`` for a float16 ``w`` [out, in]."""
    if x.shape[0] > _FEW_TOKENS:
        _rows_matmul(x, w, y, start, max(1, _BLOCK_ELEMENTS // w.shape[1]))
        return
    rows = max(1, _SMALL_PRODUCT // (x.shape[0] * w.shape[1]))
    parts = min(os.cpu_count() or 1, -(-w.shape[0] // rows))
    if parts == 1:
        _rows_matmul(x, w, y, start, rows)
        return
    cuts = [w.shape[0] * k // parts for k in range(parts + 1)]
    jobs = [
        _pool().submit(_rows_matmul, x, w[a:b], y, start + a, rows)
        for a, b in itertools.pairwise(cuts)
    ]
    for job in jobs:
        job.result()


def _linear(x: F32, weight: npt.NDArray[Any]) -> F32:
    """``x @ weight.T`` [S, out] for a float16 weight [out, in] held in memory."""
    y = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    _matmul(x, weight, y)
    return y


def _lazy_linear(x: F32, weight: _Tensor) -> F32:
    """``x @ weight.T`` for a weight read in blocks of rows, the next read while one computes."""
    out_features, in_features = weight.shape
    y = np.empty((x.shape[0], out_features), dtype=np.float32)  # [S, out]
    step = max(1, _BLOCK_ELEMENTS // in_features)
    with ThreadPoolExecutor(1, "lazyllama-read") as reader:

        def fetch(a: int) -> Future[npt.NDArray[Any]]:
            return reader.submit(weight.__getitem__, slice(a, min(a + step, out_features)))

        pending = fetch(0)
        for a in range(0, out_features, step):
            block = np.asarray(pending.result())  # [step, in]
            if a + step < out_features:
                pending = fetch(a + step)
            _matmul(x, block, y, a)
    return y


def _embed(model: Model, ids: Sequence[int]) -> F32:
    table = model["model.embed_tokens.weight"]
    rows = {i: np.asarray(table[i], dtype=np.float32) for i in set(ids)}  # only these rows are read
    return np.stack([rows[i] for i in ids])  # [S, E]


def _head(model: Model, x: F32) -> F32:
    config = model.config
    x = _rms_norm(x, model["model.norm.weight"].load(), config.rms_norm_eps)
    name = "model.embed_tokens.weight"
    if not config.tie_word_embeddings:
        try:
            model["lm_head.weight"]
        except KeyError:  # some checkpoints leave it out and rely on the embedding
            pass
        else:
            name = "lm_head.weight"
    return _lazy_linear(x, model[name])  # [S, V]


# --- decoding state ---------------------------------------------------------------------------


class _Decoder:
    """KV cache and position of one sequence; ``block`` runs one decoder layer on new tokens."""

    def __init__(self, config: _Config, capacity: int) -> None:
        self.config = config
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        if self.n_heads % self.n_kv:
            raise ValueError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv})"
            )
        self.eps = float(config.rms_norm_eps)
        self.inv_freq = rope_frequencies(config)
        shape = (config.num_hidden_layers, self.n_kv, capacity, self.head_dim)  # [L, Hkv, T, D]
        self.k_cache = np.zeros(shape, dtype=np.float32)
        self.v_cache = np.zeros(shape, dtype=np.float32)
        self.pos = 0  # tokens already in the cache
        self.rope: tuple[F32, F32] = _rope_tables(self.inv_freq, 0, 0)

    def start_pass(self, n: int) -> None:
        if self.pos + n > self.k_cache.shape[2]:
            raise RuntimeError("KV cache is full")
        self.rope = _rope_tables(self.inv_freq, self.pos, n)

    def end_pass(self, n: int, layers_seen: int) -> None:
        if layers_seen != self.config.num_hidden_layers:
            raise RuntimeError(
                f"model.layers() yielded {layers_seen} layers, "
                f"config says {self.config.num_hidden_layers}"
            )
        self.pos += n

    def block(self, i: int, w: Layer, x: F32) -> F32:
        s, h, kv, d = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        start, end = self.pos, self.pos + x.shape[0]
        cos, sin = self.rope

        a = _rms_norm(x, w["input_layernorm.weight"], self.eps)  # [S, E]
        q = _linear(a, w["self_attn.q_proj.weight"]).reshape(s, h, d)  # [S, H, D]
        k = _linear(a, w["self_attn.k_proj.weight"]).reshape(s, kv, d)  # [S, Hkv, D]
        v = _linear(a, w["self_attn.v_proj.weight"]).reshape(s, kv, d)  # [S, Hkv, D]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        self.k_cache[i, :, start:end] = k.transpose(1, 0, 2)
        self.v_cache[i, :, start:end] = v.transpose(1, 0, 2)
        keys, values = self.k_cache[i, :, :end], self.v_cache[i, :, :end]  # [Hkv, T, D]

        # Grouped-query attention: query head j reads key/value head j // (H // Hkv).
        g = h // kv
        q = q.reshape(s, kv, g, d).transpose(1, 2, 0, 3).reshape(kv, g * s, d)  # [Hkv, G*S, D]
        scores = (q * np.float32(d**-0.5)) @ keys.transpose(0, 2, 1)  # [Hkv, G*S, T]
        scores = scores.reshape(kv, g, s, end)  # [Hkv, G, S, T]
        hidden = np.arange(end)[None, :] > np.arange(start, end)[:, None]  # [S, T] causal
        scores = np.where(hidden, np.float32(-np.inf), scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        o = probs.reshape(kv, g * s, end) @ values  # [Hkv, G*S, D]
        o = o.reshape(kv, g, s, d).transpose(2, 0, 1, 3).reshape(s, h * d)  # [S, H*D]
        x = x + _linear(o, w["self_attn.o_proj.weight"])

        a = _rms_norm(x, w["post_attention_layernorm.weight"], self.eps)
        gate = _silu(_linear(a, w["mlp.gate_proj.weight"]))  # [S, I]
        x = x + _linear(gate * _linear(a, w["mlp.up_proj.weight"]), w["mlp.down_proj.weight"])
        return x


def _check_order(i: int, seen: int) -> None:
    if i != seen:
        raise RuntimeError(f"model.layers() yielded layer {i} where layer {seen} was expected")


def _pass(model: Model, dec: _Decoder, ids: Sequence[int], prefetch: int, last: bool) -> F32:
    x = _embed(model, ids)  # [S, E]
    dec.start_pass(len(ids))
    seen = 0
    layers = model.layers(prefetch=prefetch)
    try:
        for i, layer in layers:
            _check_order(i, seen)
            x = dec.block(i, layer, x)
            seen += 1
    finally:
        close = getattr(layers, "close", None)
        if close is not None:
            close()
    dec.end_pass(len(ids), seen)
    return _head(model, x[-1:] if last else x)  # [S or 1, V]


async def _apass(model: Model, dec: _Decoder, ids: Sequence[int], prefetch: int) -> F32:
    # Compute runs in worker threads (numpy releases the GIL) so the event loop stays free.
    x = await asyncio.to_thread(_embed, model, ids)
    dec.start_pass(len(ids))
    seen = 0
    layers = model.alayers(prefetch=prefetch)
    try:
        async for i, layer in layers:
            _check_order(i, seen)
            x = await asyncio.to_thread(dec.block, i, layer, x)
            seen += 1
    finally:
        aclose = getattr(layers, "aclose", None)
        if aclose is not None:
            await aclose()
    dec.end_pass(len(ids), seen)
    return await asyncio.to_thread(_head, model, x[-1:])


# --- public API -------------------------------------------------------------------------------


def _check_ids(model: Model, token_ids: Sequence[int]) -> list[int]:
    ids = []
    for t in token_ids:
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"token ids must be integers, got {type(t).__name__}") from None
    if not ids:
        raise ValueError("token_ids is empty: at least one prompt token is needed")
    vocab = model.config.vocab_size
    for position, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ValueError(
                f"token id {t} at position {position} is out of range: vocab_size is {vocab}"
            )
    return ids


def _check_count(max_new_tokens: int) -> int:
    n = operator.index(max_new_tokens)
    if n < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {n}")
    return n


def logits(model: Model, token_ids: Sequence[int], *, prefetch: int = 1) -> F32:
    """Next-token logits [len(token_ids), vocab_size] in float32, from one pass over the layers."""
    ids = _check_ids(model, token_ids)
    return _pass(model, _Decoder(model.config, len(ids)), ids, prefetch, last=False)


def stream_generate(
    model: Model, token_ids: Sequence[int], max_new_tokens: int, *, prefetch: int = 1
) -> Iterator[int]:
    """Greedily generate up to ``max_new_tokens`` ids, yielding each as soon as it is chosen.

    Arguments are checked on the call. Each yielded id costs one pass over ``model.layers()``.
    """
    ids, n = _check_ids(model, token_ids), _check_count(max_new_tokens)

    def run() -> Iterator[int]:
        dec = _Decoder(model.config, len(ids) + n)
        step = ids
        for _ in range(n):
            token = int(np.argmax(_pass(model, dec, step, prefetch, last=True)[-1]))
            yield token
            step = [token]

    return run()


def generate(
    model: Model, token_ids: Sequence[int], max_new_tokens: int, prefetch: int = 1
) -> list[int]:
    """Greedy decoding with a KV cache; returns only the ``max_new_tokens`` new ids."""
    return list(stream_generate(model, token_ids, max_new_tokens, prefetch=prefetch))


def agenerate(
    model: Model, token_ids: Sequence[int], max_new_tokens: int, prefetch: int = 1
) -> AsyncIterator[int]:
    """Async twin of `stream_generate` over ``model.alayers()``: ``async for token in ...``."""
    ids, n = _check_ids(model, token_ids), _check_count(max_new_tokens)

    async def run() -> AsyncIterator[int]:
        dec = _Decoder(model.config, len(ids) + n)
        step = ids
        for _ in range(n):
            out = await _apass(model, dec, step, prefetch)
            token = int(np.argmax(out[-1]))
            yield token
            step = [token]

    return run()
