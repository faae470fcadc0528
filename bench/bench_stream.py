"""Benchmark per-layer streaming inference: what prefetching the next layer buys, and what decoding
a checkpoint larger than the memory budget costs.

Usage::

    python bench/bench_stream.py [all|throttled|big] [--checkpoint DIR] [--big-checkpoint DIR]
                                 [--disk-mbps 500 ...] [--tokens 4] [--big-tokens 3]
                                 [--cache-bytes 2GiB] [--dtype float16|stored] [--reference]
                                 [--json bench/results/bench_stream.json]

``throttled`` (default checkpoint ``/work/ckpt/llama3-1b``): every read of lazyllama is held to
``--disk-mbps`` MB/s (a disk with one queue, by default an SSD's 500 MB/s): ``FileSet._one``
of ``lazyllama.io`` (the read of one piece) is wrapped so that each read takes its turn on one
virtual device and finishes ``nbytes / bandwidth`` after it started. ``cache_bytes=0``, so every
token reads every layer again.
Four greedy decodings through ``lazyllama.infer.stream_generate`` take turns token by token (so a
busy neighbour slows them all alike); per token, the median over the ``--tokens`` after the prompt:

- read: embedding rows, layers and lm_head read as decoding reads them, the arithmetic stubbed out;
- compute: decoding with every layer replaced by layer 0 held in memory (and the head held too):
  the same arithmetic, no reading, and little memory even for an 8B model;
- prefetch=1 and prefetch=0: real decoding from the throttled checkpoint.

The target: prefetch=1 <= 1.15 x max(read, compute), against about read + compute for prefetch=0.

``big`` (default ``/work/ckpt/llama3-8b``, written by ``bench/make_checkpoint.py llama3-8b``):
greedy decoding with ``cache_bytes=2GiB``, no throttle (the files come from the page cache when
they fit in it), reporting the time of each token and the process's peak RSS (target ≤ 3 GiB).
With ``--reference`` the hand-written reference loader of ``bench_load.py`` is measured before and
after the decoding, and the per-token time set against 1.2 × model bytes ÷ its throughput.

``--dtype stored`` opens the weights as stored (BF16 kept as bfloat16) instead of float16: no
conversion on reading, and widening to float32 for the arithmetic is one shift instead of five
passes.

Each mode runs in a fresh subprocess, so its peak RSS is its own. A table is printed and all the
figures are written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import lazyllama
from lazyllama import infer
from lazyllama.io import FileSet, Piece

PROMPT = [128000, 791, 4062, 14198, 39935, 35308, 927, 279]  # 8 ids, within Llama 3's vocab
GIB = 1 << 30


# --- a disk of fixed bandwidth ----------------------------------------------------------------


class Disk:
    """One device queue: each read starts when the previous one ends and lasts nbytes / rate."""

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.free_at = 0.0
        self.nbytes = 0
        self._lock = threading.Lock()

    def book(self, nbytes: int) -> float:
        """Reserve the device for ``nbytes``; returns when that read is done (perf_counter)."""
        with self._lock:
            start = max(time.perf_counter(), self.free_at)
            self.free_at = start + nbytes / self.rate
            self.nbytes += nbytes
            return self.free_at


@contextlib.contextmanager
def throttled(disk: Disk) -> Iterator[None]:
    real = FileSet._one

    async def one(self: FileSet, piece: Piece, *rest: Any) -> None:
        done = disk.book(piece.nbytes)
        await real(self, piece, *rest)
        delay = done - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    FileSet._one = one  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileSet._one = real  # type: ignore[method-assign]


@contextlib.contextmanager
def no_arithmetic() -> Iterator[None]:
    """Stub out the matrix work of ``lazyllama.infer`` so that a token costs only its reads."""
    block, matmul = infer._Decoder.block, infer._matmul
    infer._Decoder.block = lambda self, i, w, x: x  # type: ignore[method-assign]
    infer._matmul = lambda x, w, y, start=0: None
    try:
        yield
    finally:
        infer._Decoder.block, infer._matmul = block, matmul  # type: ignore[method-assign]


# --- an in-memory model with the same face --------------------------------------------------


@dataclass
class Held:
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def load(self) -> np.ndarray:
        return self.array

    def __getitem__(self, key: int | slice) -> np.ndarray:
        return self.array[key]


class ComputeOnly:
    """Decoding's arithmetic without its reads: every layer is layer 0 and, like the final norm
    and the head, already in memory. The same shapes cost the same compute; the ids differ."""

    def __init__(self, model: lazyllama.LazyModel) -> None:
        self.model = model
        self.config = model.config
        self.layer: dict[str, np.ndarray] = {}
        for _, layer in model.layers(prefetch=0):
            self.layer = dict(layer)
            break
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in model
        names = ["model.norm.weight", "model.embed_tokens.weight" if tied else "lm_head.weight"]
        self.held = {name: model[name].load() for name in names}

    def __getitem__(self, name: str) -> Any:
        held = self.held.get(name)
        return self.model[name] if held is None else Held(held)  # else: embedding rows, a few KB

    def layers(self, prefetch: int = 1) -> Iterator[tuple[int, Mapping[str, np.ndarray]]]:
        for i in range(self.config.num_hidden_layers):
            yield i, self.layer

    def alayers(self, prefetch: int = 1) -> Any:
        raise NotImplementedError


# --- measurements -----------------------------------------------------------------------------


def token_times(model: Any, tokens: int, prefetch: int = 1) -> tuple[list[float], list[int]]:
    """Seconds per generated token (the first includes the prompt) and the ids."""
    times, ids = [], []
    prompt = [t % model.config.vocab_size for t in PROMPT]
    t = time.perf_counter()
    for token in infer.stream_generate(model, prompt, tokens, prefetch=prefetch):
        now = time.perf_counter()
        times.append(now - t)
        ids.append(token)
        t = now
    return times, ids


def steady(times: list[float]) -> float:
    """Per-token time once the prompt is in: the median of the tokens after the first."""
    return statistics.median(times[1:] if len(times) > 1 else times)


MODES = ("read", "compute", "prefetch1", "prefetch0")


def run_throttled(args: argparse.Namespace) -> dict[str, Any]:
    path = args.checkpoint
    with lazyllama.open(path, dtype=_dtype(args), cache_bytes=0) as model:
        stored = sum(model[n].nbytes for n in model)
        held = ComputeOnly(model)
        prompt = [t % model.config.vocab_size for t in PROMPT]
        out: dict[str, Any] = {
            "checkpoint": str(path),
            "dtype": args.dtype,
            "stored_bytes": stored,
            "tokens": args.tokens,
            "runs": [],
        }
        for mbps in args.disk_mbps:
            disk = Disk(mbps * 1e6)
            # One generator per mode; a step of one is a pass over the layers. The modes take
            # turns, token by token, so that a busy neighbour slows them all alike.
            streams = {
                "read": infer.stream_generate(model, prompt, args.tokens + 1, prefetch=1),
                "compute": infer.stream_generate(held, prompt, args.tokens + 1),
                "prefetch1": infer.stream_generate(model, prompt, args.tokens + 1, prefetch=1),
                "prefetch0": infer.stream_generate(model, prompt, args.tokens + 1, prefetch=0),
            }
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
            ids: dict[str, list[int]] = {mode: [] for mode in MODES}
            read_bytes = []
            with throttled(disk):
                for step in range(args.tokens + 1):  # step 0 holds the prompt: not counted
                    for mode in MODES:
                        before = disk.nbytes
                        with no_arithmetic() if mode == "read" else contextlib.nullcontext():
                            t, t_cpu = time.perf_counter(), time.process_time()
                            ids[mode].append(next(streams[mode]))
                            times[mode].append(time.perf_counter() - t)
                            cpu[mode].append(time.process_time() - t_cpu)
                        if mode == "read" and step:
                            read_bytes.append(disk.nbytes - before)
                    print(
                        f"{mbps:g} MB/s, token {step}: "
                        + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in MODES),
                        file=sys.stderr,
                    )
            if ids["prefetch1"] != ids["prefetch0"]:
                raise AssertionError(f"modes disagree on the tokens: {ids}")
            r, c, p1, p0 = (statistics.median(times[m][1:]) for m in MODES)
            r_cpu, c_cpu = (statistics.median(cpu[m][1:]) for m in ("read", "compute"))
            out["runs"].append(
                {
                    "disk_mbps": mbps,
                    "bytes_per_token": statistics.median(read_bytes),
                    "read_s": r,
                    "compute_s": c,
                    "prefetch1_s": p1,
                    "prefetch0_s": p0,
                    "prefetch1_over_max": p1 / max(r, c),
                    "prefetch0_over_sum": p0 / (r + c),
                    "target_met": p1 <= 1.15 * max(r, c),
                    # CPU seconds (all threads) of a read-only and a compute-only token: when
                    # their sum over the cores exceeds max(read, compute), the cores, not the
                    # disk, bound what overlapping can give.
                    "read_cpu_s": r_cpu,
                    "compute_cpu_s": c_cpu,
                    "cpu_bound_s": (r_cpu + c_cpu) / (os.cpu_count() or 1),
                    "token_s": times,
                    "token_cpu_s": cpu,
                }
            )
    return out


def run_big(args: argparse.Namespace) -> dict[str, Any]:
    path = args.big_checkpoint
    before = reference_gbps(path) if args.reference else None
    with lazyllama.open(path, dtype=_dtype(args), cache_bytes=args.cache_bytes) as model:
        rss_open = current_rss()
        stored = sum(model[n].nbytes for n in model)
        times, ids = token_times(model, args.big_tokens)
        stats = model.cache_stats()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "checkpoint": str(path),
        "dtype": args.dtype,
        "cache_bytes": args.cache_bytes,
        "stored_bytes": stored,
        "tokens": args.big_tokens,
        "token_s": times,
        "per_token_s": steady(times),
        "ids": ids,
        "rss_after_open_bytes": rss_open,
        "peak_rss_bytes": peak,
        "target_met": peak <= 3 * GIB,
        "cache_stats": dataclasses.asdict(stats),
    }
    if before is not None:
        ref = (before + reference_gbps(path)) / 2
        allowed = 1.2 * stored / (ref * 1e9)
        out["reference_gbps"] = ref
        out["per_token_allowed_s"] = allowed
        out["per_token_met"] = out["per_token_s"] <= allowed
    return out


def reference_gbps(path: Path) -> float:
    """The hand-written reference loader's throughput (median of 3, GB/s), measured by
    ``bench_load.py`` in processes of its own, as the load benchmark measures it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.json"
        script = Path(__file__).with_name("bench_load.py")
        cmd = [sys.executable, str(script), str(path), "--gb", "4", "--repeats", "3"]
        cmd += ["--methods", "reference", "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return float(json.loads(out.read_text())["load"]["reference"]["gbps_median"])


def _dtype(args: argparse.Namespace) -> str | None:
    """The ``dtype`` weights are opened with: float16, or as stored (``None``)."""
    return None if args.dtype == "stored" else str(args.dtype)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- report -----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = []
    if "throttled" in results:
        t = results["throttled"]
        lines += [
            f"throttled: {t['checkpoint']} ({t['stored_bytes'] / 1e9:.2f} GB), "
            f"dtype={t['dtype']}, cache_bytes=0, "
            f"{t['tokens']} tokens, seconds per token (median after the first)",
            f"{'disk MB/s':>10} {'read':>8} {'compute':>8} {'prefetch=1':>11} {'prefetch=0':>11}"
            f" {'p1/max(r,c)':>12} {'p0/(r+c)':>9} {'target':>7} {'cpu bound':>10}",
        ]
        for run in t["runs"]:
            lines.append(
                f"{run['disk_mbps']:>10g} {run['read_s']:>8.2f} {run['compute_s']:>8.2f} "
                f"{run['prefetch1_s']:>11.2f} {run['prefetch0_s']:>11.2f} "
                f"{run['prefetch1_over_max']:>12.3f} {run['prefetch0_over_sum']:>9.3f} "
                f"{'ok' if run['target_met'] else 'MISSED':>7} {run['cpu_bound_s']:>10.2f}"
            )
        lines.append(
            "cpu bound: (CPU seconds of a read-only token + of a compute-only token) / cores, "
            "the least prefetch=1 can take when both need the cores"
        )
    if "big" in results:
        b = results["big"]
        lines += [
            "",
            f"big: {b['checkpoint']}, dtype={b['dtype']}, cache_bytes={b['cache_bytes']}, "
            f"{b['tokens']} tokens, "
            "no throttle",
            f"  seconds per token: {', '.join(f'{s:.2f}' for s in b['token_s'])} "
            f"(median after the first {b['per_token_s']:.2f})",
            f"  peak RSS {b['peak_rss_bytes'] / GIB:.2f} GiB (target ≤ 3 GiB: "
            f"{'ok' if b['target_met'] else 'MISSED'}), after open "
            f"{b['rss_after_open_bytes'] / GIB:.2f} GiB",
        ]
        if "reference_gbps" in b:
            lines.append(
                f"  reference loader {b['reference_gbps']:.2f} GB/s (before and after): "
                f"1.2 × {b['stored_bytes'] / 1e9:.2f} GB ÷ that = "
                f"{b['per_token_allowed_s']:.2f} s per token allowed "
                f"({'ok' if b['per_token_met'] else 'MISSED'})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="all", choices=["all", "throttled", "big"])
    parser.add_argument("--checkpoint", type=Path, default=Path("/work/ckpt/llama3-1b"))
    parser.add_argument("--big-checkpoint", type=Path, default=Path("/work/ckpt/llama3-8b"))
    parser.add_argument("--disk-mbps", type=float, nargs="+", default=[500.0])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--big-tokens", type=int, default=3)
    parser.add_argument("--cache-bytes", default="2GiB")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="big: measure the reference loader before and after, for the per-token target",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "stored"],
        default="float16",
        help="open the weights as float16 (converted on reading) or as stored (BF16 kept)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/bench_stream.json"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"cpus": os.cpu_count(), "argv": sys.argv[1:]}
    if args.mode == "all":  # each mode in a process of its own, for a peak RSS of its own
        for mode in ("throttled", "big"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / f"{mode}.json"
                rest = [a for a in sys.argv[1:] if a not in ("all",)]
                cmd = [sys.executable, __file__, mode, *rest, "--json", str(out)]
                subprocess.run(cmd, check=True)
                results[mode] = json.loads(out.read_text())[mode]
    elif args.mode == "throttled":
        results["throttled"] = run_throttled(args)
    else:
        results["big"] = run_big(args)
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
