"""A process that forks after using lazyllama can use it in the child: the parent's loop and
workers do not survive the fork, so the child must start its own, not wait on dead ones."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import lazyllama

from ._robust_helpers import MINI_CONFIG, watchdog, write_index
from .conftest import oracle_f16, st_save

JOIN_SECONDS = 60
fork = multiprocessing.get_context("fork")


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() + f"{a.dtype}{a.shape}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fork")
    rng = np.random.default_rng(3)
    tensors = {
        f"w{i}": rng.standard_normal((256, 512), dtype=np.float32).astype(ml_dtypes.bfloat16)
        for i in range(6)
    }
    st_save(dict(list(tensors.items())[:3]), root / "a.safetensors")
    st_save(dict(list(tensors.items())[3:]), root / "b.safetensors")
    write_index(
        root, {n: "a.safetensors" if i < 3 else "b.safetensors" for i, n in enumerate(tensors)}
    )
    (root / "config.json").write_text(json.dumps(MINI_CONFIG))
    return root


@pytest.fixture(scope="module")
def want(ckpt: Path) -> dict[str, str]:
    return {n: digest(a) for n, a in oracle_f16(ckpt).items()}


def run_child(target: Callable[[Connection], None]) -> Any:
    """Run ``target(conn)`` in a forked child; return what it sent, failing if it hangs."""
    ours, theirs = fork.Pipe()
    child = fork.Process(target=_guarded, args=(target, theirs), daemon=True)
    child.start()
    theirs.close()
    child.join(JOIN_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the forked child hung for {JOIN_SECONDS}s")
    assert ours.poll(), f"the child sent nothing (exit code {child.exitcode})"
    status, payload = ours.recv()
    assert status == "ok", payload
    assert child.exitcode == 0
    return payload


def _guarded(target: Callable[[Connection], None], conn: Connection) -> None:
    try:
        target(conn)
    except BaseException as e:
        import traceback

        conn.send(("error", "".join(traceback.format_exception(e))))
    finally:
        conn.close()


def test_child_loads_after_the_parent_did(ckpt: Path, want: dict[str, str]) -> None:
    with watchdog(JOIN_SECONDS * 2), lazyllama.open(ckpt, cache_bytes="1MiB") as model:
        assert digest(model["w0"].load()) == want["w0"]

        def child(conn: Connection) -> None:
            got = {
                "w4": digest(model["w4"].load()),  # never read by the parent
                "w0": digest(model["w0"].load()),  # cached in the parent, not here
                "rows": digest(model["w1"][10:20]),
                "w3": digest(asyncio_load(model, "w3")),
            }
            model.close()
            conn.send(("ok", got))

        got = run_child(child)
        assert got["w4"] == want["w4"] and got["w0"] == want["w0"] and got["w3"] == want["w3"]
        rows = oracle_f16(ckpt)["w1"][10:20]
        assert got["rows"] == digest(rows)
        # The parent is untouched by the child's use and close.
        for name in ("w0", "w4", "w5"):
            assert digest(model[name].load()) == want[name]


def asyncio_load(model: lazyllama.LazyModel, name: str) -> np.ndarray:
    import asyncio

    async def go() -> np.ndarray:
        return await model[name].aload()

    return asyncio.run(go())


def test_fork_while_the_parent_is_reading(ckpt: Path, want: dict[str, str]) -> None:
    """Fork in the middle of reads on other threads: locks those threads held at the fork
    must not be waited on in the child."""
    stop = threading.Event()
    errors: list[BaseException] = []

    with watchdog(JOIN_SECONDS * 3), lazyllama.open(ckpt, cache_bytes="300KiB") as model:

        def busy(names: list[str]) -> None:
            try:
                while not stop.is_set():
                    for n in names:
                        if digest(model[n].load()) != want[n]:
                            raise AssertionError(n)
            except BaseException as e:
                errors.append(e)

        readers = [threading.Thread(target=busy, args=(list(want)[i::2],)) for i in range(2)]
        for r in readers:
            r.start()
        try:

            def child(conn: Connection) -> None:
                conn.send(("ok", {n: digest(model[n].load()) for n in want}))

            for _ in range(3):
                assert run_child(child) == want
        finally:
            stop.set()
            for r in readers:
                r.join()
    assert not errors, errors


def test_child_opens_its_own_model_and_leaves_cleanly(ckpt: Path, want: dict[str, str]) -> None:
    with watchdog(JOIN_SECONDS * 2), lazyllama.open(ckpt) as model:
        model["w2"].load()

        def child(conn: Connection) -> None:
            with lazyllama.open(ckpt) as mine:
                got = digest(mine["w5"].load())
            conn.send(("ok", (got, digest(model["w2"].load()))))

        got, inherited = run_child(child)
        assert got == want["w5"] and inherited == want["w2"]


def test_child_closing_an_unused_inherited_model_does_not_hang(ckpt: Path) -> None:
    with watchdog(JOIN_SECONDS * 2), lazyllama.open(ckpt) as model:
        model["w2"].load()

        def child(conn: Connection) -> None:
            model.close()
            with pytest.raises(lazyllama.ClosedError):
                model["w2"].load()
            conn.send(("ok", None))

        run_child(child)
        assert model["w2"].load().shape == (256, 512)  # the parent's model is still open
