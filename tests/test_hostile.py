"""Hostile folders and headers: an index pointing outside its folder, shards that disagree
with it, broken configs, directories where files should be, a header of a million tensors.

Each gives its own error, of the class DESIGN.md names, with the offending file in the message.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import pstats
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lazyllama
import lazyllama.io
from lazyllama import CheckpointError, HeaderError
from lazyllama.format import MAX_HEADER_BYTES
from lazyllama.writer import save_file

from ._robust_helpers import MINI_CONFIG, fd_targets, open_fds, write_index
from .conftest import oracle, same_bits, st_save


def folder(tmp_path: Path, shard: str = "a.safetensors") -> Path:
    """A checkpoint folder holding config.json and one good shard, ``a.safetensors`` (for an
    index to name) or ``model.safetensors`` (found without one)."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(MINI_CONFIG))
    st_save({"a": np.arange(4, dtype=np.float32)}, root / shard)
    return root


def outside_file(tmp_path: Path) -> Path:
    """A perfectly valid safetensors file that lies outside the checkpoint folder."""
    path = tmp_path / "x"
    st_save({"secret": np.ones(3, np.float32)}, path)
    return path


def raises_naming(
    cls: type[BaseException], path: Path, fn: Callable[[], Any], *parts: str
) -> BaseException:
    """Assert ``fn()`` raises ``cls`` whose message names ``path`` and contains ``parts``."""
    with pytest.raises(cls) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, lazyllama.LazyLlamaError)
    assert str(path) in message, message
    for part in parts:
        assert part in message, message
    return info.value


# -- an index that points outside its folder ------------------------------------------------


def test_index_shard_dot_dot_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    outside_file(tmp_path)
    index = write_index(root, {"a": "a.safetensors", "secret": "../x"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'../x'", "outside")


def test_index_shard_absolute_path_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    target = outside_file(tmp_path)
    index = write_index(root, {"a": "a.safetensors", "secret": str(target)})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), repr(str(target)))


def test_index_shard_absolute_path_inside_the_folder_is_refused_too(tmp_path: Path) -> None:
    root = folder(tmp_path)
    index = write_index(root, {"a": str(root / "a.safetensors")})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root))


def test_index_shard_symlink_resolving_outside_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "link.safetensors").symlink_to(outside_file(tmp_path))
    index = write_index(root, {"a": "a.safetensors", "secret": "link.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'link.safetensors'")


def test_index_shard_inside_a_symlinked_directory_resolving_outside_is_refused(
    tmp_path: Path,
) -> None:
    root = folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    st_save({"secret": np.ones(3, np.float32)}, elsewhere / "s.safetensors")
    (root / "sub").symlink_to(elsewhere, target_is_directory=True)
    index = write_index(root, {"secret": "sub/s.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "sub/s.safetensors")


def test_index_shard_symlink_staying_inside_is_fine(tmp_path: Path) -> None:
    """The rule is about where a shard resolves, not about symlinks as such."""
    root = folder(tmp_path)
    (root / "alias.safetensors").symlink_to(root / "a.safetensors")
    write_index(root, {"a": "alias.safetensors"})
    with lazyllama.open(root) as model:
        assert model["a"].load().tolist() == [0, 1, 2, 3]


def test_index_shard_with_a_nul_byte_is_a_checkpoint_error(tmp_path: Path) -> None:
    """An untrusted index may hold any string; a NUL must not escape as a bare ValueError."""
    root = folder(tmp_path)
    index = write_index(root, {"a": "a.safetensors\x00../../x"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root))


def test_index_shard_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "d.safetensors").mkdir()
    index = write_index(root, {"a": "d.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'d.safetensors'")


def test_index_shard_missing_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path)
    index = write_index(root, {"a": "a.safetensors", "b": "gone.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'gone.safetensors'")


# -- an index that disagrees with its shards ------------------------------------------------


def test_tensor_named_by_the_index_missing_from_its_shard(tmp_path: Path) -> None:
    root = folder(tmp_path)
    index = write_index(root, {"a": "a.safetensors", "ghost": "a.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'ghost'")


def test_tensor_placed_in_the_wrong_shard(tmp_path: Path) -> None:
    root = folder(tmp_path)
    st_save({"b": np.ones(2, np.float32)}, root / "b.safetensors")
    index = write_index(root, {"a": "b.safetensors", "b": "b.safetensors"})
    raises_naming(CheckpointError, index, lambda: lazyllama.open(root), "'a'")


def test_one_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    root = folder(tmp_path)
    save_file({"a": np.zeros(4, np.float32)}, root / "b.safetensors")
    write_index(root, {"a": "a.safetensors", "other": "b.safetensors"})
    error = raises_naming(HeaderError, root / "a.safetensors", lambda: lazyllama.open(root), "'a'")
    assert str(root / "b.safetensors") in str(error)


def test_one_tensor_in_two_unindexed_shards(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(MINI_CONFIG))
    st_save({"a": np.ones(2, np.float32)}, root / "model-00001-of-00002.safetensors")
    save_file({"a": np.ones(2, np.float32)}, root / "model-00002-of-00002.safetensors")
    error = raises_naming(HeaderError, root, lambda: lazyllama.open(root), "'a'")
    assert "model-00001-of-00002" in str(error) and "model-00002-of-00002" in str(error)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    root = folder(tmp_path)
    index = root / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "a.safetensors",')
    raises_naming(HeaderError, index, lambda: lazyllama.open(root))


@pytest.mark.parametrize(
    "body",
    [[], {"weight_map": ["a"]}, {"weight_map": {"a": 1}}, {"metadata": {}}, "x"],
    ids=["list", "map-is-list", "shard-not-str", "no-weight-map", "string"],
)
def test_index_without_a_weight_map_of_strings(tmp_path: Path, body: object) -> None:
    root = folder(tmp_path)
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps(body))
    raises_naming(HeaderError, index, lambda: lazyllama.open(root), "weight_map")


def test_shard_with_a_broken_header_is_named(tmp_path: Path) -> None:
    root = folder(tmp_path)
    bad = root / "b.safetensors"
    bad.write_bytes((100).to_bytes(8, "little") + b"{}")
    write_index(root, {"a": "a.safetensors", "b": "b.safetensors"})
    raises_naming(HeaderError, bad, lambda: lazyllama.open(root))


def test_a_bad_shard_among_many_leaves_no_read_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard's header fails while the others are still being read: opening fails with
    that shard's error, and the other reads are finished or stopped, not abandoned on a loop
    that stops (their files left open, their coroutines destroyed pending)."""
    root = folder(tmp_path)
    weight_map = {"a": "a.safetensors"}
    for i in range(8):
        names = [f"s{i}.{j}" for j in range(4000)]
        save_file(dict.fromkeys(names, np.zeros(1, np.uint8)), root / f"s{i}.safetensors")
        weight_map.update(dict.fromkeys(names, f"s{i}.safetensors"))
    bad = root / "0bad.safetensors"  # sorts first: fails while the others are under way
    bad.write_bytes((100).to_bytes(8, "little") + b"{}")
    weight_map["bad"] = bad.name
    write_index(root, weight_map)

    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    fds = open_fds()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        raises_naming(HeaderError, bad, lambda: lazyllama.open(root))
        leaked = sorted(fd_targets(open_fds() - fds).values())
        gc.collect()
    assert leaked == [], f"files left open by the failed open: {leaked}"
    assert [str(u.exc_value) for u in unraisable] == []
    assert [str(w.message) for w in record if issubclass(w.category, ResourceWarning)] == []


# -- config.json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["{hidden_size: 16}", "", '{"hidden_size": 16', "\xff\xfe", "[1, 2"],
    ids=["bare-keys", "empty", "truncated", "not-utf8", "open-list"],
)
def test_config_that_is_not_json(tmp_path: Path, text: str) -> None:
    root = folder(tmp_path, "model.safetensors")
    config = root / "config.json"
    config.write_bytes(text.encode("latin-1"))
    raises_naming(HeaderError, config, lambda: lazyllama.open(root))


def test_config_nested_too_deeply(tmp_path: Path) -> None:
    root = folder(tmp_path, "model.safetensors")
    config = root / "config.json"
    config.write_text("[" * 100_000 + "]" * 100_000)
    raises_naming(HeaderError, config, lambda: lazyllama.open(root))


@pytest.mark.parametrize("body", [[], "llama", 3, None], ids=["list", "string", "int", "null"])
def test_config_that_is_not_an_object(tmp_path: Path, body: object) -> None:
    root = folder(tmp_path, "model.safetensors")
    config = root / "config.json"
    config.write_text(json.dumps(body))
    raises_naming(HeaderError, config, lambda: lazyllama.open(root))


@pytest.mark.parametrize("missing", sorted(MINI_CONFIG))
def test_config_lacking_a_required_field(tmp_path: Path, missing: str) -> None:
    root = folder(tmp_path, "model.safetensors")
    config = root / "config.json"
    config.write_text(json.dumps({k: v for k, v in MINI_CONFIG.items() if k != missing}))
    raises_naming(HeaderError, config, lambda: lazyllama.open(root), missing)


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    root = folder(tmp_path, "model.safetensors")
    (root / "config.json").unlink()
    (root / "config.json").mkdir()
    raises_naming(CheckpointError, root / "config.json", lambda: lazyllama.open(root))


# -- directories where files should be ------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.safetensors"])
def test_a_directory_named_like_a_single_file_checkpoint(tmp_path: Path, name: str) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(MINI_CONFIG))
    (root / name).mkdir()
    raises_naming(CheckpointError, root / name, lambda: lazyllama.open(root))


def test_a_directory_named_like_a_file_opened_directly(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.mkdir()
    raises_naming(CheckpointError, path, lambda: lazyllama.open(path))


def test_an_empty_model_safetensors(tmp_path: Path) -> None:
    root = folder(tmp_path)
    empty = root / "model.safetensors"
    empty.write_bytes(b"")
    raises_naming(HeaderError, empty, lambda: lazyllama.open(root))


# -- a header of a million tensors ----------------------------------------------------------


def write_many(path: Path, count: int) -> int:
    """``count`` one-byte U8 tensors ``t0000000``…, their byte ``i % 251``; the header size."""
    entries = ",".join(
        f'"t{i:07d}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
        for i in range(count)
    )
    raw = ("{" + entries + "}").encode()
    raw += b" " * (-len(raw) % 8)
    data = (bytes(range(251)) * (count // 251 + 1))[:count]
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.write(data)
    return len(raw)


def calls_to_open(path: Path) -> tuple[int, lazyllama.LazyModel]:
    """Python function calls made while opening ``path``: on the caller's thread (the model's
    table) and on the background loop (the header's parse), counted with cProfile."""
    counts: list[int] = []
    real = lazyllama.io.parse_header

    def counted(*args: Any, **kwargs: Any) -> Any:
        prof = cProfile.Profile(builtins=False)
        prof.enable()
        try:
            return real(*args, **kwargs)
        finally:
            prof.disable()
            counts.append(pstats.Stats(prof).total_calls)

    prof = cProfile.Profile(builtins=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lazyllama.io, "parse_header", counted)
        prof.enable()
        try:
            model = lazyllama.open(path, dtype=None)
        finally:
            prof.disable()
    assert len(counts) == 1
    return counts[0] + pstats.Stats(prof).total_calls, model


def test_a_million_tensors_open_in_work_linear_in_their_count(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    work = {}
    # The test process's own objects are frozen out of the collector's way: what is counted is
    # lazyllama's calls, and the collector's passes over unrelated objects only slow the run.
    gc.collect()
    gc.freeze()
    request.addfinalizer(gc.unfreeze)
    for count in (100_000, 1_000_000):
        path = tmp_path / f"many{count}.safetensors"
        header_bytes = write_many(path, count)
        assert header_bytes <= MAX_HEADER_BYTES
        work[count], model = calls_to_open(path)
        with model:
            assert len(model) == count
            for i in (0, count // 2 + 1, count - 1):
                t = model[f"t{i:07d}"]
                assert (t.shape, t.source_dtype, t.nbytes) == ((1,), "U8", 1)
                assert t.load().tolist() == [i % 251]
        os.unlink(path)
    assert work[1_000_000] / work[100_000] < 15, work


def test_small_scale_equals_the_oracle(tmp_path: Path) -> None:
    """The file the scale test writes is read the same by the safetensors package."""
    path = tmp_path / "many.safetensors"
    write_many(path, 1000)
    want = oracle(path)
    with lazyllama.open(path, dtype=None) as model:
        got = model.load()
    assert list(got) == [f"t{i:07d}" for i in range(1000)]
    for name, arr in got.items():
        assert same_bits(arr, want[name])
