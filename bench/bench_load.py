"""Benchmark BF16 → float16 loading of a safetensors checkpoint: lazyllama against other ways.

Usage::

    python bench/bench_load.py CHECKPOINT_DIR [--gb 4] [--repeats 3] [--json out.json]
                               [--png out.png] [--methods a,b,...] [--stream | --stream-only]
                               [--memory prefault|fresh] [--ref-chunk-mib 1]

Every method loads the same tensors (the first ``--gb`` GB of tensor data, in file order) and
converts them to float16. Each run is a fresh subprocess, so its peak RSS is its own; repeats go
round-robin over the methods so that a noisy neighbour hurts all of them alike, and before each
run the parent reads the files once (``cat``-style) so they come from the page cache, and waits
up to ``--quiet-wait`` s for the rest of the machine to calm down. Each run records the CPU time
it used and the cores the rest of the machine kept busy meanwhile: on a shared machine, CPU
seconds per GB is the steadier figure.

All methods keep every output array alive until the run ends (the natural use of a bulk load), so
peak RSS is at least the float16 output size; the table shows the overhead above that too.

``--memory prefault`` (default) pays the first touch of the output memory before the clock starts
(see ``prefault_heap``): on this virtual machine that costs more than the conversion and varies a
lot. ``--memory fresh`` leaves it in, as a one-shot load in a new process sees it.

Methods:

- ``lazyllama``: ``lazyllama.open(dir, dtype="float16", cache_bytes=0)`` then
  ``model.load(names, progress=False)``.
- ``lazyllama-aload``: the same through ``await lazyllama.aopen(...)`` and ``await
  model.aload(names)`` inside ``asyncio.run``; a 1 ms ticker in the same loop measures how late
  the loop runs callbacks while the load is in flight.
- ``safetensors-numpy``: ``safe_open(file, framework="np").get_tensor(name).astype(np.float16)``
  (BF16 arrays need ``import ml_dtypes``; without it safetensors raises "data type 'bfloat16' not
  understood"). ``get_tensor`` copies the bytes out of the file mapping, ``astype`` converts with
  ml_dtypes on one core.
- ``safetensors-torch``: ``safe_open(file, framework="pt").get_tensor(name).half()`` with
  ``torch.set_num_threads(os.cpu_count())``.
- ``reference``: ``bench/_ref.py``: chunked ``os.preadv`` into per-thread buffers and ml_dtypes
  conversion into preallocated outputs on every core; what this machine allows with the same
  conversion library. ``reference-bits`` converts with numpy integer ops instead and
  ``reference-torch`` with torch (see ``_ref.py``); ``reference@4`` etc. set the chunk in MiB.
- ``reference-async``: the reference run by ``loop.run_in_executor`` beside the same 1 ms ticker
  as ``lazyllama-aload``: the event-loop lateness any loader that keeps both cores busy causes.

Also measured: ``lazyllama.open()`` time and bytes read during it (``rchar`` in /proc/self/io),
and with ``--stream`` a layer-by-layer walk (``model.layers(prefetch=1)`` with
``cache_bytes="1GiB"``) against the same walk with safetensors + torch (``get_tensor(name).half()``
for each tensor of a layer, dropped before the next layer).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ref import TensorEntry, list_tensors, load_reference, select_prefix

REF_CONVERT = {"reference": "ml_dtypes", "reference-bits": "bits", "reference-torch": "torch"}
LOAD_METHODS = [
    "lazyllama",
    "lazyllama-aload",
    "safetensors-numpy",
    "safetensors-torch",
    "reference",
    "reference-bits",
    "reference-torch",
    "reference-async",
]
STREAM_METHODS = ["stream-lazyllama", "stream-safetensors-torch"]
CHILD_TIMEOUT_S = 1800
MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- child side


class MemorySampler:
    """Samples RssAnon / RssFile of this process every few ms; ``ru_maxrss`` gives only the sum."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self.max_anon = 0
        self.max_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        anon = file = 0
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(b"RssFile:"):
                    file = int(line.split()[1]) * 1024
        return anon, file

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = self.read()
            self.max_anon = max(self.max_anon, anon)
            self.max_file = max(self.max_file, file)
            self._stop.wait(self.period_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        anon, file = self.read()
        self.max_anon = max(self.max_anon, anon)
        self.max_file = max(self.max_file, file)


def prefault_heap(nbytes: int) -> float:
    """Touch ``nbytes`` of heap once and free it; return the first-touch rate in GB/s.

    On this virtual machine the first write to fresh memory costs the kernel 1-3 CPU seconds per
    GB, more than the conversion itself, and the figure swings with what the host is doing. All
    loaders pay it alike for their outputs, so by default it is paid here, before timing; with
    the environment of ``child_env(prefault=True)`` the outputs then reuse these pages.
    """
    import numpy as np

    t0 = time.perf_counter()
    block = np.empty(nbytes, dtype=np.uint8)
    block[::4096] = 1
    del block
    return nbytes / (time.perf_counter() - t0) / 1e9


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def system_busy_seconds() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def current_rss() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def digest(arrays: dict[str, Any]) -> str:
    """A cheap fingerprint of the outputs (samples of every tensor) to check methods agree."""
    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        flat = a.reshape(-1)
        h.update(flat[:4096].tobytes())
        h.update(flat[-4096:].tobytes())
        h.update(flat[::65537][:4096].tobytes())
    return h.hexdigest()


def _load_lazyllama(ckpt: str, names: list[str]) -> dict[str, Any]:
    import lazyllama

    model = lazyllama.open(ckpt, dtype="float16", cache_bytes=0)
    try:
        out = model.load(names, progress=False)
    finally:
        model.close()
    return dict(out)


def _with_ticker(load: Callable[[], Awaitable[dict[str, Any]]], extra: dict[str, Any]) -> Any:
    """Run ``load()`` in a fresh event loop beside a 1 ms ticker; record how late the ticks came
    while idle (a baseline) and while ``load()`` ran, and the load's own duration."""

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        lateness: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            # Ask to wake every 1 ms; how late each wake-up comes is how long the loop was busy.
            while not stop.is_set():
                due = loop.time() + 0.001
                await asyncio.sleep(0.001)
                lateness.append(loop.time() - due)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.25)
        idle = list(lateness)
        lateness.clear()
        t0 = time.perf_counter()
        out = await load()
        extra["load_s"] = time.perf_counter() - t0
        busy = list(lateness)
        stop.set()
        await tick
        extra["lag_idle"] = _lag_stats(idle)
        extra["lag_during_load"] = _lag_stats(busy)
        return out

    return asyncio.run(run())


def _load_lazyllama_async(ckpt: str, names: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    import lazyllama

    async def load() -> dict[str, Any]:
        model = await lazyllama.aopen(ckpt, dtype="float16", cache_bytes=0)
        try:
            return dict(await model.aload(names, progress=False))
        finally:
            await model.aclose()

    return dict(_with_ticker(load, extra))


def _load_reference_async(
    entries: list[TensorEntry], chunk: int, convert: str, extra: dict[str, Any]
) -> dict[str, Any]:
    async def load() -> dict[str, Any]:
        # The plain way to keep a loop responsive: the blocking loader on a worker thread.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, load_reference, entries, chunk, None, convert)

    return dict(_with_ticker(load, extra))


def _lag_stats(lateness: list[float]) -> dict[str, float]:
    if not lateness:
        return {"n": 0}
    ms = sorted(x * 1000 for x in lateness)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return {"n": len(ms), "max_ms": ms[-1], "p99_ms": p99, "median_ms": statistics.median(ms)}


def _group_by_file(entries: list[TensorEntry]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for e in entries:
        groups.setdefault(e.file, []).append(e.name)
    return groups


def _load_safetensors_numpy(entries: list[TensorEntry]) -> dict[str, Any]:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors needs)
    import numpy as np
    from safetensors import safe_open

    out = {}
    for path, names in _group_by_file(entries).items():
        with safe_open(str(path), framework="np") as f:
            for name in names:
                out[name] = f.get_tensor(name).astype(np.float16)
    return out


def _load_safetensors_torch(entries: list[TensorEntry]) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for path, names in _group_by_file(entries).items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                out[name] = f.get_tensor(name).half().numpy()
    return out


def _stream_lazyllama(ckpt: str) -> tuple[int, int]:
    import lazyllama

    nbytes = layers = 0
    with lazyllama.open(ckpt, dtype="float16", cache_bytes="1GiB") as model:
        for _, layer in model.layers(prefetch=1):
            nbytes += sum(a.nbytes for a in layer.values())
            layers += 1
            del layer
    return nbytes, layers


def _stream_safetensors_torch(ckpt: str, entries: list[TensorEntry]) -> tuple[int, int]:
    import torch
    from safetensors import safe_open

    torch.set_num_threads(os.cpu_count() or 1)
    by_layer: dict[int, list[TensorEntry]] = {}
    for e in entries:
        m = re.match(r"model\.layers\.(\d+)\.", e.name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(e)
    handles: dict[Path, Any] = {}
    nbytes = 0
    try:
        for i in sorted(by_layer):
            layer = {}
            for e in by_layer[i]:
                if e.file not in handles:
                    handles[e.file] = safe_open(str(e.file), framework="pt").__enter__()
                layer[e.name] = handles[e.file].get_tensor(e.name).half()
            nbytes += sum(t.numel() * t.element_size() for t in layer.values())
            del layer
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return nbytes, len(by_layer)


def _open_lazyllama(ckpt: str) -> dict[str, Any]:
    import lazyllama

    before = proc_io()
    t0 = time.perf_counter()
    model = lazyllama.open(ckpt)
    dt = time.perf_counter() - t0
    after = proc_io()
    n = len(list(model.keys())) if hasattr(model, "keys") else None
    model.close()
    return {
        "open_s": dt,
        "rchar": after["rchar"] - before["rchar"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "syscr": after["syscr"] - before["syscr"],
        "tensors": n,
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this (fresh) process and return its result record."""
    method, ckpt = spec["method"], spec["ckpt"]
    all_entries = list_tensors(Path(ckpt))
    wanted = set(spec["names"])
    entries = [e for e in all_entries if e.name in wanted]
    names = [e.name for e in entries]
    source_bytes = sum(e.nbytes for e in entries)
    if method.startswith("stream-"):
        source_bytes = sum(e.nbytes for e in all_entries if e.name.startswith("model.layers."))
    # Import what the method needs before the clock starts: import time is not load time.
    if method.startswith(("lazyllama", "stream-lazyllama", "open-")):
        import lazyllama  # noqa: F401
    if "torch" in method:
        import torch

        # The reference runs one converting thread per core itself.
        torch.set_num_threads(1 if method.startswith("reference") else os.cpu_count() or 1)
    if method == "safetensors-numpy" or method.startswith("reference"):
        import ml_dtypes  # noqa: F401

    gc.collect()
    result: dict[str, Any] = {"method": method, "source_bytes": source_bytes}
    if method == "open-lazyllama":
        result.update(_open_lazyllama(ckpt))
        return result
    anon0, file0 = MemorySampler.read()
    base_rss = current_rss()
    if spec.get("prefault") and not method.startswith("stream-"):
        result["first_touch_gbps"] = prefault_heap(source_bytes)
    extra: dict[str, Any] = {}
    ru0, busy0 = resource.getrusage(resource.RUSAGE_SELF), system_busy_seconds()
    io0 = proc_io()
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        if method == "lazyllama":
            out = _load_lazyllama(ckpt, names)
        elif method == "lazyllama-aload":
            out = _load_lazyllama_async(ckpt, names, extra)
        elif method == "safetensors-numpy":
            out = _load_safetensors_numpy(entries)
        elif method == "safetensors-torch":
            out = _load_safetensors_torch(entries)
        elif method.startswith("reference"):
            # "reference@4" runs the reference with 4 MiB chunks (to tune it).
            base, _, mib = method.partition("@")
            chunk = int(float(mib) * MiB) if mib else int(spec["ref_chunk_bytes"])
            if base == "reference-async":
                out = _load_reference_async(entries, chunk, "ml_dtypes", extra)
            else:
                out = load_reference(entries, chunk_bytes=chunk, convert=REF_CONVERT[base])
        elif method == "stream-lazyllama":
            out = {}
            extra["stream_bytes"], extra["layers"] = _stream_lazyllama(ckpt)
        elif method == "stream-safetensors-torch":
            out = {}
            extra["stream_bytes"], extra["layers"] = _stream_safetensors_torch(ckpt, all_entries)
        else:
            raise ValueError(f"unknown method {method!r}")
        elapsed = time.perf_counter() - t0
        # The async run also idles to measure a baseline lateness; count only open + aload.
        elapsed = extra.pop("load_s", elapsed)
    wall = time.perf_counter() - t0
    ru1, busy1 = resource.getrusage(resource.RUSAGE_SELF), system_busy_seconds()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    result["cpu_seconds"] = cpu
    # Bytes that came from the disk rather than the page cache (should be ~0 when warm).
    result["disk_read_bytes"] = proc_io()["read_bytes"] - io0["read_bytes"]
    result["sys_seconds"] = ru1.ru_stime - ru0.ru_stime
    # CPU the rest of the machine used meanwhile, in cores: how noisy this run was.
    result["others_cores"] = max(0.0, (busy1 - busy0) - cpu) / wall
    result.update(extra)
    result.update(
        {
            "seconds": elapsed,
            "peak_rss": maxrss_bytes(),
            "base_rss": base_rss,
            "peak_anon": mem.max_anon,
            "peak_file": mem.max_file,
            "base_anon": anon0,
            "base_file": file0,
        }
    )
    if out:
        import numpy as np

        missing = set(names) - set(out)
        if missing:
            raise RuntimeError(f"{method}: {len(missing)} tensors missing, e.g. {min(missing)}")
        for e in entries:
            a = np.asarray(out[e.name])
            if a.dtype != np.float16 or a.shape != e.shape:
                raise RuntimeError(f"{method}: {e.name} came back {a.dtype}{a.shape}")
        result["output_bytes"] = sum(np.asarray(a).nbytes for a in out.values())
        result["digest"] = digest(out)
    return result


# ----------------------------------------------------------------------------- parent side


def warm_page_cache(entries: list[TensorEntry]) -> float:
    """Read every file once up to the end of the last of ``entries`` in it, as ``cat`` would."""
    t0 = time.perf_counter()
    ends: dict[Path, int] = {}
    for e in entries:
        ends[e.file] = max(ends.get(e.file, 0), e.offset + e.nbytes)
    buf = bytearray(16 * MiB)
    for path, end in ends.items():
        left = end
        with open(path, "rb", buffering=0) as f:
            while left > 0:
                n = f.readinto(buf)
                if not n:
                    break
                left -= n
    return time.perf_counter() - t0


def child_env(prefault: bool = False) -> dict[str, str]:
    """The environment of every child: the repo root importable even when not installed.

    With ``prefault``, glibc malloc serves everything from one heap that it never gives back, so
    memory touched once before the clock starts is reused by the load (see ``prefault_heap``).
    """
    path = os.environ.get("PYTHONPATH", "")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else ""),
        "LAZYLLAMA_DISABLE_PROGRESS_BARS": "1",
    }
    if prefault:
        env.update(
            {
                "MALLOC_ARENA_MAX": "1",
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": str(1 << 50),
            }
        )
    return env


def wait_for_quiet(below: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for a second in which the machine's other processes keep fewer
    than ``below`` cores busy; return the load of the last second measured."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        load = (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if load < below or time.monotonic() >= deadline:
            return load


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", spec_path],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=child_env(bool(spec.get("prefault")) and not spec["method"].startswith("stream-")),
        )
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "error": f"timed out after {CHILD_TIMEOUT_S} s"}
    finally:
        os.unlink(spec_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"method": spec["method"], "error": "\n".join(tail) or f"exit {proc.returncode}"}
    return dict(json.loads(lines[-1]))


def _fmt_mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for m in methods:
        ok = [r for r in runs if r["method"] == m and "error" not in r]
        errors = [r["error"] for r in runs if r["method"] == m and "error" in r]
        if not ok:
            summary[m] = {"error": errors[0] if errors else "not run"}
            continue
        gbps = [r["source_bytes"] / r["seconds"] / 1e9 for r in ok]
        s: dict[str, Any] = {
            "runs": len(ok),
            "gbps_median": statistics.median(gbps),
            "gbps_min": min(gbps),
            "gbps_max": max(gbps),
            "seconds_median": statistics.median(r["seconds"] for r in ok),
            "cpu_s_per_gb_median": statistics.median(
                r["cpu_seconds"] / (r["source_bytes"] / 1e9) for r in ok
            ),
            "others_cores_median": statistics.median(r["others_cores"] for r in ok),
            "disk_read_bytes_max": max(r.get("disk_read_bytes", 0) for r in ok),
            "sys_s_per_gb_median": statistics.median(
                r["sys_seconds"] / (r["source_bytes"] / 1e9) for r in ok
            ),
            "peak_rss_median": statistics.median(r["peak_rss"] for r in ok),
            "peak_anon_median": statistics.median(r["peak_anon"] for r in ok),
            "peak_file_median": statistics.median(r["peak_file"] for r in ok),
            "base_rss_median": statistics.median(r["base_rss"] for r in ok),
            "digests": sorted({r.get("digest", "") for r in ok}),
        }
        touch = [r["first_touch_gbps"] for r in ok if "first_touch_gbps" in r]
        if touch:
            s["first_touch_gbps"] = touch
        outb = [r.get("output_bytes", 0) for r in ok]
        s["output_bytes"] = outb[0]
        s["overhead_median"] = statistics.median(
            r["peak_rss"] - r["base_rss"] - r.get("output_bytes", 0) for r in ok
        )
        if errors:
            s["errors"] = errors
        for key in ("lag_idle", "lag_during_load"):
            lags = [r[key] for r in ok if key in r and r[key].get("n")]
            if lags:
                s[key] = {
                    "max_ms_median": statistics.median(x["max_ms"] for x in lags),
                    "max_ms_worst": max(x["max_ms"] for x in lags),
                    "p99_ms_median": statistics.median(x["p99_ms"] for x in lags),
                    "median_ms_median": statistics.median(x["median_ms"] for x in lags),
                }
        if "stream_bytes" in ok[0]:
            s["stream_bytes"] = ok[0]["stream_bytes"]
            s["layers"] = ok[0]["layers"]
        summary[m] = s
    return summary


SHORT = {
    "lazyllama": "lazy",
    "lazyllama-aload": "lazy-a",
    "safetensors-numpy": "st-np",
    "safetensors-torch": "st-pt",
    "reference": "ref",
    "reference-bits": "ref-bit",
    "reference-torch": "ref-pt",
    "reference-async": "ref-as",
}


def short(method: str) -> str:
    """A column label for ``method``: "reference@4" becomes "ref@4"."""
    base, at, rest = method.partition("@")
    return SHORT.get(base, base[:6]) + at + rest


def print_load_table(summary: dict[str, dict[str, Any]], methods: list[str]) -> None:
    good = [m for m in methods if "error" not in summary[m]]
    print()
    header = f"{'method':<18}{'GB/s med':>9}{'min':>7}{'max':>7}{'CPUs/GB':>8}{'others':>7}"
    header += f"{'peak RSS':>9}{'over out':>9}{'anon':>7}{'file':>7} "
    header += "".join(f"{'/' + short(m):>9}" for m in good)
    print(header)
    print("-" * len(header))
    for m in methods:
        s = summary[m]
        if "error" in s:
            print(f"{m:<18}  failed: {s['error'].splitlines()[-1][:100]}")
            continue
        row = f"{m:<18}{s['gbps_median']:>9.3f}{s['gbps_min']:>7.3f}{s['gbps_max']:>7.3f}"
        row += f"{s['cpu_s_per_gb_median']:>8.2f}{s['others_cores_median']:>7.2f}"
        row += f"{_fmt_mib(s['peak_rss_median']):>9}{_fmt_mib(s['overhead_median']):>9}"
        row += f"{_fmt_mib(s['peak_anon_median']):>7}{_fmt_mib(s['peak_file_median']):>7} "
        row += "".join(f"{s['gbps_median'] / summary[o]['gbps_median']:>9.2f}" for o in good)
        print(row)
    print(
        "\nGB/s = 1e9 bytes of BF16 source per second (median over repeats, min/max beside it). "
        "CPUs/GB = CPU seconds (user + sys) this process spent per GB; others = cores the rest of "
        "the machine kept busy meanwhile (noise). "
        "Memory in MiB: peak RSS (ru_maxrss), 'over out' = peak RSS - RSS before the load - "
        "float16 output bytes; anon/file = peak RssAnon / RssFile (file = mapped file pages). "
        "Column '/x' = this method's median GB/s divided by x's; "
        + ", ".join(f"{v} = {k}" for k, v in SHORT.items())
        + "."
    )
    touch = [r for m in good for r in summary[m].get("first_touch_gbps", [])]
    if touch:
        print(
            f"Outputs landed in prefaulted heap pages; touching them first ran at "
            f"{statistics.median(touch):.2f} GB/s (median; min {min(touch):.2f}), a cost not "
            "in the figures above (--memory fresh includes it)."
        )
    cold = [
        m for m in good if summary[m]["disk_read_bytes_max"] > 0.01 * summary[m]["output_bytes"]
    ]
    if cold:
        print("WARNING: some runs read from the disk, not the page cache:", ", ".join(cold))
    digests = {m: summary[m]["digests"] for m in good}
    distinct = {d for ds in digests.values() for d in ds}
    if len(distinct) > 1:
        print("WARNING: outputs differ between methods/runs:", json.dumps(digests, indent=1))
    elif distinct:
        print("outputs identical across methods (sampled fingerprint).")
    for m in good:
        for key in ("lag_idle", "lag_during_load"):
            if key in summary[m]:
                lag = summary[m][key]
                print(
                    f"{m} event-loop lateness {key.removeprefix('lag_')}: "
                    f"max {lag['max_ms_median']:.2f} ms (worst {lag['max_ms_worst']:.2f}), "
                    f"p99 {lag['p99_ms_median']:.2f} ms, median {lag['median_ms_median']:.3f} ms"
                )


def print_stream_table(summary: dict[str, dict[str, Any]], methods: list[str]) -> None:
    print()
    header = f"{'stream method':<26}{'layers':>7}{'GB f16':>8}{'s med':>8}{'GB/s':>7}{'CPUs/GB':>8}"
    header += f"{'peak RSS':>10}{'over base':>10}{'anon':>8}{'file':>8}"
    print(header)
    print("-" * len(header))
    for m in methods:
        s = summary[m]
        if "error" in s:
            print(f"{m:<26}  failed: {s['error'].splitlines()[-1][:100]}")
            continue
        print(
            f"{m:<26}{s['layers']:>7}{s['stream_bytes'] / 1e9:>8.2f}{s['seconds_median']:>8.2f}"
            f"{s['gbps_median']:>7.2f}{s['cpu_s_per_gb_median']:>8.2f}"
            f"{_fmt_mib(s['peak_rss_median']):>10}"
            f"{_fmt_mib(s['peak_rss_median'] - s['base_rss_median']):>10}"
            f"{_fmt_mib(s['peak_anon_median']):>8}{_fmt_mib(s['peak_file_median']):>8}"
        )
    print(
        "Each walk converts every decoder layer to float16 and drops it before the next; GB/s is "
        "of BF16 source. 'over base' = peak RSS - RSS before the walk (imports, torch)."
    )


def plot(summary: dict[str, dict[str, Any]], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [m for m in methods if "error" not in summary[m]]
    if not good:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    labels = [short(m) for m in good]
    colors = ["tab:blue" if m.startswith("lazyllama") else "tab:gray" for m in good]
    med = [summary[m]["gbps_median"] for m in good]
    lo = [summary[m]["gbps_median"] - summary[m]["gbps_min"] for m in good]
    hi = [summary[m]["gbps_max"] - summary[m]["gbps_median"] for m in good]
    ax1.bar(labels, med, yerr=[lo, hi], capsize=4, color=colors)
    for i, v in enumerate(med):  # at the foot of the bar, clear of the min-max whisker
        ax1.text(i, 0.02 * max(med), f"{v:.2f}", ha="center", color="white", fontsize=8)
    ax1.set_ylabel("GB/s of BF16 source (median; bars: min-max)")
    ax1.set_title("throughput (higher is better)")
    cpu = [summary[m]["cpu_s_per_gb_median"] for m in good]
    bars = ax2.bar(labels, cpu, color=colors)
    ax2.bar_label(bars, fmt="%.2f", label_type="center", color="white", fontsize=8)
    ax2.set_ylabel("CPU seconds per GB (median)")
    ax2.set_title("CPU spent (lower is better)")
    rss = [summary[m]["peak_rss_median"] / MiB for m in good]
    anon = [summary[m]["peak_anon_median"] / MiB for m in good]
    ax3.bar(labels, rss, color="tab:orange", label="peak RSS")
    ax3.bar(labels, anon, color="tab:red", alpha=0.6, label="peak RssAnon")
    out_mib = max(summary[m]["output_bytes"] for m in good) / MiB
    if out_mib:
        ax3.axhline(out_mib, color="k", ls="--", lw=1, label="float16 output")
    ax3.set_ylabel("MiB")
    ax3.set_title("peak memory")
    ax3.legend(fontsize=8, loc="lower right")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lazyllama_revision() -> str:
    """The commit of the repository the children import lazyllama from, "+dirty" if edited."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "lazyllama"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def lazyllama_importable() -> str | None:
    proc = subprocess.run(
        [sys.executable, "-c", "import lazyllama; lazyllama.open"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def torch_importable() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path, nargs="?")
    ap.add_argument("--gb", type=float, default=4.0, help="GB (1e9 bytes) of BF16 data to load")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(LOAD_METHODS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--stream", action="store_true", help="also run the layer streaming walk")
    ap.add_argument("--stream-only", action="store_true", help="only the layer streaming walk")
    ap.add_argument("--ref-chunk-mib", type=float, default=1.0, help="reference read chunk")
    ap.add_argument("--open-repeats", type=int, default=3)
    ap.add_argument(
        "--memory",
        choices=["prefault", "fresh"],
        default="prefault",
        help="prefault: outputs land in heap pages touched before timing (stable figures); "
        "fresh: the default allocator, first-touch page faults included",
    )
    ap.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each run wait for the rest of the machine to use fewer cores than this",
    )
    ap.add_argument("--quiet-wait", type=float, default=20.0, help="longest such wait, seconds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        try:
            result = run_child(spec)
        except Exception:
            traceback.print_exc()
            return 1
        print(json.dumps(result))
        return 0
    if args.ckpt is None:
        ap.error("CHECKPOINT_DIR is required")

    ckpt = args.ckpt.resolve()
    entries = list_tensors(ckpt)
    chosen = select_prefix(entries, int(args.gb * 1e9))
    names = [e.name for e in chosen]
    total = sum(e.nbytes for e in chosen)
    print(
        f"{ckpt}: {len(entries)} tensors, {sum(e.nbytes for e in entries) / 1e9:.2f} GB; "
        f"loading the first {len(chosen)} ({total / 1e9:.3f} GB, {chosen[0].name} .. "
        f"{chosen[-1].name}); {os.cpu_count()} CPUs"
    )
    missing_lazyllama = lazyllama_importable()
    print(f"lazyllama from {REPO_ROOT} at revision {lazyllama_revision()}")
    if missing_lazyllama:
        print(f"lazyllama not usable, its methods will be skipped: {missing_lazyllama}")
    methods = [m for m in args.methods.split(",") if m]
    if not torch_importable():
        methods = [m for m in methods if "torch" not in m]
    if args.stream_only:
        methods = []
    spec_base = {
        "ckpt": str(ckpt),
        "names": names,
        "prefault": args.memory == "prefault",
        "ref_chunk_bytes": int(args.ref_chunk_mib * MiB),
    }

    runs: list[dict[str, Any]] = []
    record: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "gb": args.gb,
        "tensors": len(chosen),
        "source_bytes": total,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "ref_chunk_bytes": spec_base["ref_chunk_bytes"],
        "memory": args.memory,
        "lazyllama_revision": lazyllama_revision(),
    }
    if methods:
        warm_s = warm_page_cache(chosen)
        print(f"page cache warmed in {warm_s:.1f} s ({total / warm_s / 1e9:.2f} GB/s)")
    for r in range(args.repeats):
        for m in methods:
            if m.startswith("lazyllama") and missing_lazyllama:
                runs.append({"method": m, "error": missing_lazyllama})
                continue
            # Re-warm before every run: this machine's memory manager pages out file pages that
            # went unused for about a minute, so a warm-up done once would not last.
            warm_page_cache(chosen)
            pre_load = wait_for_quiet(args.quiet_below, args.quiet_wait)
            res = spawn({**spec_base, "method": m})
            res["pre_load"] = pre_load
            res["repeat"] = r
            runs.append(res)
            if "error" in res:
                print(
                    f"  [{r + 1}/{args.repeats}] {m}: ERROR\n    "
                    + res["error"].replace("\n", "\n    ")
                )
            else:
                gbps = res["source_bytes"] / res["seconds"] / 1e9
                print(
                    f"  [{r + 1}/{args.repeats}] {m:<18} {res['seconds']:7.2f} s  "
                    f"{gbps:6.3f} GB/s  cpu {res['cpu_seconds']:6.2f} s  "
                    f"others {res['others_cores']:4.2f}  peak RSS {_fmt_mib(res['peak_rss'])} MiB"
                    f"  disk {res['disk_read_bytes'] / 1e6:,.0f} MB"
                )
    if methods:
        summary = summarize(runs, methods)
        print_load_table(summary, methods)
        record["load"] = summary

    if not missing_lazyllama and methods:
        opens = [spawn({**spec_base, "method": "open-lazyllama"}) for _ in range(args.open_repeats)]
        ok = [o for o in opens if "error" not in o]
        # The first tensor of each file starts right after its header.
        header_bytes = sum(e.offset for e in _first_per_file(entries))
        if ok:
            o_med = statistics.median(o["open_s"] for o in ok)
            print(
                f"\nlazyllama.open(): median {o_med * 1000:.1f} ms over {len(ok)} runs; "
                f"rchar {ok[0]['rchar']:,} bytes in {ok[0]['syscr']} read calls "
                f"(headers incl. length prefix: {header_bytes:,} bytes; "
                f"disk read_bytes {ok[0]['read_bytes']:,})"
            )
            record["open"] = {"runs": ok, "open_s_median": o_med, "header_bytes": header_bytes}
        else:
            print(f"\nlazyllama.open() measurement failed: {opens[0]['error']}")

    if args.stream or args.stream_only:
        stream_methods = [
            m for m in STREAM_METHODS if not ("torch" in m and not torch_importable())
        ]
        layer_entries = [e for e in entries if e.name.startswith("model.layers.")]
        stream_runs = []
        for r in range(args.repeats):
            for m in stream_methods:
                if "lazyllama" in m and missing_lazyllama:
                    stream_runs.append({"method": m, "error": missing_lazyllama})
                    continue
                warm_page_cache(layer_entries)
                pre_load = wait_for_quiet(args.quiet_below, args.quiet_wait)
                res = spawn({**spec_base, "names": [], "method": m})
                res["pre_load"] = pre_load
                stream_runs.append(res)
                if "error" in res:
                    print(f"  [{r + 1}/{args.repeats}] {m}: ERROR\n    " + res["error"])
                else:
                    print(
                        f"  [{r + 1}/{args.repeats}] {m:<26} {res['seconds']:7.2f} s  "
                        f"peak RSS {_fmt_mib(res['peak_rss'])} MiB"
                    )
        stream_summary = summarize(stream_runs, stream_methods)
        print_stream_table(stream_summary, stream_methods)
        record["stream"] = stream_summary
        runs += stream_runs

    record["runs"] = runs
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    if args.png and methods:
        title = f"{ckpt.name}: first {total / 1e9:.2f} GB BF16 -> float16, {os.cpu_count()} CPUs"
        plot(record["load"], methods, args.png, title)
        print(f"wrote {args.png}")
    return 0


def _first_per_file(entries: list[TensorEntry]) -> list[TensorEntry]:
    seen: dict[Path, TensorEntry] = {}
    for e in entries:
        seen.setdefault(e.file, e)
    return list(seen.values())


if __name__ == "__main__":
    raise SystemExit(main())
