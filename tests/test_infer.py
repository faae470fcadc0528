"""Inference against transformers, on small random Llama checkpoints that transformers writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a test extra (pip install torch)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is a test extra (pip install transformers)"
)

import lazyllama  # noqa: E402
from lazyllama import infer  # noqa: E402
from lazyllama.infer import (  # noqa: E402
    agenerate,
    generate,
    logits,
    rope_frequencies,
    stream_generate,
)

VOCAB = 512
PROMPT = [1, 17, 300, 42, 511, 0, 99, 42, 256, 7, 128, 3]  # 12 ids: both ends, one repeat
NEW_TOKENS = 16
# With head_dim 16 and rope_theta 1e4, original_max_position_embeddings 32 puts the rotary
# wavelengths in all three llama3 bands (kept, blended, slowed); prompt + new tokens pass 32.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@dataclass(frozen=True)
class Spec:
    layers: int
    rope_theta: float
    rope: dict[str, Any] | None = None
    tie: bool = False
    bf16: bool = False
    shard: str | None = None


SPECS = {
    "llama3-sharded": Spec(layers=3, rope_theta=1e4, rope=LLAMA3_ROPE, shard="40KB"),
    "tied": Spec(layers=2, rope_theta=5e5, tie=True),
    "bf16": Spec(layers=2, rope_theta=1e4, rope=LLAMA3_ROPE, bf16=True),
}


def _legacy_rope(key: str) -> Callable[[dict[str, Any]], None]:
    """Rewrites a config.json as Llama 3.1 checkpoints have it: rope_theta at the top level and
    rope_scaling naming its kind under ``key`` (transformers 5 writes ``rope_parameters``)."""

    def rewrite(config: dict[str, Any]) -> None:
        params = config.pop("rope_parameters", None)
        if params is not None:
            params = dict(params)
            config["rope_theta"] = params.pop("rope_theta")
            config["rope_scaling"] = params
        scaling = dict(config["rope_scaling"])
        scaling[key] = scaling.pop("rope_type")
        config["rope_scaling"] = scaling

    return rewrite


def _untie(config: dict[str, Any]) -> None:
    config["tie_word_embeddings"] = False


# Variants: the weights of a spec with config.json rewritten; same reference outputs.
VARIANTS: dict[str, tuple[str, Callable[[dict[str, Any]], None] | None]] = {
    **{name: (name, None) for name in SPECS},
    "llama3-legacy-config": ("llama3-sharded", _legacy_rope("rope_type")),
    "llama3-legacy-type-key": ("llama3-sharded", _legacy_rope("type")),
    "no-lm-head-untied-config": ("tied", _untie),
}


@dataclass
class Reference:
    path: Path
    logits: np.ndarray  # [12, VOCAB] float32, from transformers
    tokens: list[int]  # 16 greedy ids, from transformers


def _build(spec: Spec, path: Path) -> Reference:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # wide enough that greedy decoding does not repeat one id
        tie_word_embeddings=spec.tie,
        rope_theta=spec.rope_theta,
        rope_scaling=None if spec.rope is None else dict(spec.rope),  # a copy: it gets edited
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        if spec.bf16:
            model.to(torch.bfloat16)
        else:
            for p in model.parameters():  # lazyllama hands out float16: compare like with like
                p.data = p.data.half().float()
    model.save_pretrained(path, max_shard_size=spec.shard or "50MB")
    model.float()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref_logits = model(ids).logits[0].numpy()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )
    return Reference(path, ref_logits, out[0, len(PROMPT) :].tolist())


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    built: dict[str, Reference] = {}

    def get(variant: str) -> Reference:
        if variant not in built:
            base, rewrite = VARIANTS[variant]
            if base not in built:
                built[base] = _build(SPECS[base], tmp_path_factory.mktemp(base))
            ref = built[base]
            if rewrite is not None:
                path = tmp_path_factory.mktemp(variant)
                shutil.copytree(ref.path, path, dirs_exist_ok=True)
                config = json.loads((path / "config.json").read_text())
                rewrite(config)
                (path / "config.json").write_text(json.dumps(config))
                ref = Reference(path, ref.logits, ref.tokens)
            built[variant] = ref
        return built[variant]

    return get


@pytest.fixture(params=list(VARIANTS))
def ref(request: pytest.FixtureRequest, references: Callable[[str], Reference]) -> Reference:
    return references(request.param)


@pytest.fixture
def model(references: Callable[[str], Reference]) -> Iterator[Any]:
    with lazyllama.open(references("llama3-sharded").path) as m:
        yield m


class Counting:
    """Forwards to a model, counting passes over its layers and recording reads of some tensors."""

    def __init__(self, model: Any, watch: tuple[str, ...] = ()) -> None:
        self.model = model
        self.watch = watch
        self.passes = 0
        self.reads: dict[str, list[Any]] = {name: [] for name in watch}

    @property
    def config(self) -> Any:
        return self.model.config

    def __getitem__(self, name: str) -> Any:
        tensor = self.model[name]
        return Recording(tensor, self.reads[name]) if name in self.watch else tensor

    def layers(self, prefetch: int = 1) -> Any:
        self.passes += 1
        return self.model.layers(prefetch=prefetch)

    def alayers(self, prefetch: int = 1) -> Any:
        self.passes += 1
        return self.model.alayers(prefetch=prefetch)


class Recording:
    def __init__(self, tensor: Any, log: list[Any]) -> None:
        self.tensor, self.log = tensor, log

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def load(self) -> np.ndarray:
        self.log.append("load")
        return np.asarray(self.tensor.load())

    def __getitem__(self, key: Any) -> np.ndarray:
        self.log.append(key)
        return np.asarray(self.tensor[key])


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == np.float32
    err = float(np.abs(got - want).max())
    assert err <= 1e-3 * float(np.abs(want).max()), f"max|Δ| = {err}"


# --- the fixtures are what they claim ---------------------------------------------------------


def test_a_layer_is_split_across_shards(references: Callable[[str], Reference]) -> None:
    index = json.loads(
        (references("llama3-sharded").path / "model.safetensors.index.json").read_text()
    )
    files: dict[str, set[str]] = {}
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            files.setdefault(name.split(".")[2], set()).add(file)
    assert any(len(f) >= 2 for f in files.values()), files


def test_bf16_checkpoint_is_stored_as_bf16(references: Callable[[str], Reference]) -> None:
    from safetensors import safe_open

    for file in references("bf16").path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names = f.keys()
            assert {f.get_slice(name).get_dtype() for name in names} == {"BF16"}


def test_tied_checkpoint_has_no_lm_head(references: Callable[[str], Reference]) -> None:
    with lazyllama.open(references("tied").path) as m:
        assert m.config.tie_word_embeddings
        with pytest.raises(KeyError):
            m["lm_head.weight"]


# --- agreement with transformers --------------------------------------------------------------


def test_logits_match_transformers(ref: Reference) -> None:
    with lazyllama.open(ref.path) as m:
        _assert_close(logits(m, PROMPT), ref.logits)


def test_greedy_tokens_match_transformers(ref: Reference) -> None:
    with lazyllama.open(ref.path) as m:
        counting = Counting(m)
        assert generate(counting, PROMPT, NEW_TOKENS) == ref.tokens
        assert counting.passes == NEW_TOKENS  # the prompt rides in the first pass


async def test_agenerate_matches_transformers(ref: Reference) -> None:
    async with lazyllama.open(ref.path) as m:
        counting = Counting(m)
        tokens = []
        async for token in agenerate(counting, PROMPT, NEW_TOKENS):
            tokens.append(token)
            assert counting.passes == len(tokens)  # each id as soon as its pass ends
    assert tokens == ref.tokens


@pytest.mark.parametrize("prefetch", [0, 2])
def test_prefetch_does_not_change_tokens(
    references: Callable[[str], Reference], prefetch: int
) -> None:
    ref = references("llama3-sharded")
    with lazyllama.open(ref.path) as m:
        assert generate(m, PROMPT, 4, prefetch=prefetch) == ref.tokens[:4]


def test_stream_generate_yields_as_it_goes(model: Any) -> None:
    counting = Counting(model)
    stream = stream_generate(counting, PROMPT, NEW_TOKENS)
    assert counting.passes == 0
    first = next(stream)
    assert counting.passes == 1
    assert [first, *stream] == generate(model, PROMPT, NEW_TOKENS)
    assert counting.passes == NEW_TOKENS


def test_zero_new_tokens_reads_no_layer(model: Any) -> None:
    counting = Counting(model)
    assert generate(counting, PROMPT, 0) == []
    assert counting.passes == 0


# --- what is read -----------------------------------------------------------------------------


def test_reads_only_prompt_rows_and_head_in_row_blocks(
    references: Callable[[str], Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = references("llama3-sharded")
    monkeypatch.setattr(infer, "_BLOCK_ELEMENTS", 100 * 64)  # 100 rows of hidden size 64
    with lazyllama.open(ref.path) as m:
        counting = Counting(m, watch=("model.embed_tokens.weight", "lm_head.weight"))
        _assert_close(logits(counting, PROMPT), ref.logits)
    assert sorted(counting.reads["model.embed_tokens.weight"]) == sorted(set(PROMPT))
    blocks = counting.reads["lm_head.weight"]
    assert all(isinstance(b, slice) and b.stop - b.start <= 100 for b in blocks), blocks
    assert [(b.start, b.stop) for b in blocks] == [
        (a, min(a + 100, VOCAB)) for a in range(0, VOCAB, 100)
    ]


def test_tied_head_reads_embedding_in_row_blocks(
    references: Callable[[str], Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = references("tied")
    monkeypatch.setattr(infer, "_BLOCK_ELEMENTS", 200 * 64)
    with lazyllama.open(ref.path) as m:
        counting = Counting(m, watch=("model.embed_tokens.weight",))
        _assert_close(logits(counting, PROMPT), ref.logits)
    reads = counting.reads["model.embed_tokens.weight"]
    assert "load" not in reads
    assert [r for r in reads if isinstance(r, slice)] == [
        slice(0, 200),
        slice(200, 400),
        slice(400, 512),
    ]


@pytest.mark.parametrize("few_tokens", [32, 4])
def test_blocked_and_threaded_products_agree(
    references: Callable[[str], Reference], monkeypatch: pytest.MonkeyPatch, few_tokens: int
) -> None:
    # Real sizes cut every product into blocks, spread over threads for a few tokens at a time;
    # shrink the blocks so that the fixture goes through the same paths.
    ref = references("llama3-sharded")
    monkeypatch.setattr(infer, "_SMALL_PRODUCT", 12 * 64 * 5)  # 5 rows for 12 tokens
    monkeypatch.setattr(infer, "_BLOCK_ELEMENTS", 7 * 64)
    monkeypatch.setattr(infer, "_FEW_TOKENS", few_tokens)
    monkeypatch.setattr(infer.os, "cpu_count", lambda: 3)
    with lazyllama.open(ref.path) as m:
        _assert_close(logits(m, PROMPT), ref.logits)
        assert generate(m, PROMPT, 4) == ref.tokens[:4]


def test_widen_matches_numpy_cast_for_every_float16() -> None:
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 2)  # subnormals, zeros of both signs, ±65504
    scratch = np.empty(finite.shape, np.int32)
    got = infer._widen(finite, scratch)
    assert np.shares_memory(got, scratch)  # the fast way
    np.testing.assert_array_equal(got, finite.astype(np.float32))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(finite))
    rows = every.reshape(-1, 64)  # rows holding inf or NaN fall back to numpy's cast
    got = np.concatenate([infer._widen(r[None], np.empty((1, 64), np.int32)) for r in rows])
    np.testing.assert_array_equal(got, every.astype(np.float32).reshape(-1, 64))


def test_widen_is_exact_for_every_bfloat16() -> None:
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    every = every.reshape(-1, 256)  # inf, NaN and subnormals included: a bfloat16 widens exactly
    scratch = np.empty(every.shape, np.int32)
    got = infer._widen(every, scratch)
    assert np.shares_memory(got, scratch)  # the fast way
    np.testing.assert_array_equal(got.view(np.uint32), every.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("variant", ["llama3-sharded", "bf16"])
def test_stored_dtype_weights_work_too(
    references: Callable[[str], Reference], variant: str
) -> None:
    ref = references(variant)
    with lazyllama.open(ref.path, dtype=None) as m:  # float32 or bfloat16 arrays
        assert m["model.layers.0.mlp.up_proj.weight"].load().dtype != np.float16
        _assert_close(logits(m, PROMPT), ref.logits)
        assert generate(m, PROMPT, NEW_TOKENS) == ref.tokens


# --- rotary frequencies -----------------------------------------------------------------------


def _config(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> SimpleNamespace:
    return SimpleNamespace(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
    ids=["default", "llama3-small", "llama3.1-8b", "linear"],
)
@pytest.mark.parametrize(("head_dim", "theta"), [(16, 1e4), (128, 5e5)])
def test_rope_frequencies_match_transformers(
    scaling: dict[str, Any] | None, head_dim: int, theta: float
) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=None if scaling is None else dict(scaling),
    )
    if scaling is None:
        want = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    else:
        want = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")[0].numpy()
    got = rope_frequencies(_config(head_dim, theta, scaling))  # type: ignore[arg-type]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    old_type = dict(scaling or {}, type=(scaling or {}).get("rope_type"))
    old_type.pop("rope_type", None)
    np.testing.assert_allclose(
        rope_frequencies(_config(head_dim, theta, old_type if scaling else None)),  # type: ignore[arg-type]
        got,
    )


def test_llama3_fixture_uses_every_band() -> None:
    plain = rope_frequencies(_config(16, 1e4, None))  # type: ignore[arg-type]
    scaled = rope_frequencies(_config(16, 1e4, LLAMA3_ROPE))  # type: ignore[arg-type]
    ratio = plain / scaled
    assert np.any(ratio == 1.0)
    assert np.any(ratio == 8.0)
    assert np.any((ratio > 1.0) & (ratio < 8.0))


def test_unknown_rope_type_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_frequencies(_config(16, 1e4, {"rope_type": "yarn", "factor": 2.0}))  # type: ignore[arg-type]


# --- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "match"),
    [([], "empty"), ([0, VOCAB], f"{VOCAB} .*out of range"), ([-1], "-1 .*out of range")],
)
def test_bad_prompts_are_refused(model: Any, ids: list[int], match: str) -> None:
    counting = Counting(model)
    with pytest.raises(ValueError, match=match):
        logits(counting, ids)
    with pytest.raises(ValueError, match=match):
        generate(counting, ids, 2)
    with pytest.raises(ValueError, match=match):
        stream_generate(counting, ids, 2)  # on the call, not the first next()
    with pytest.raises(ValueError, match=match):
        agenerate(counting, ids, 2)
    assert counting.passes == 0


def test_non_integer_ids_are_refused(model: Any) -> None:
    with pytest.raises(TypeError, match="integers"):
        generate(model, [1, 2.5], 1)  # type: ignore[list-item]


def test_negative_max_new_tokens_is_refused(model: Any) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, PROMPT, -1)


def test_numpy_ids_are_accepted(model: Any) -> None:
    assert generate(model, np.array(PROMPT), 2) == generate(model, PROMPT, 2)
