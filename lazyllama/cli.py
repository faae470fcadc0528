"""``lazyllama inspect | load | stream | generate | demo``: the command line over the library."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import open as open_model
from .errors import LazyLlamaError
from .model import DEFAULT_CACHE_BYTES, DEFAULT_CONCURRENCY, LazyModel

__all__ = ["main"]

DEFAULT_PATH = "models/llama3-8b-instruct"
DEMO_DIR = "demo-model"


def _params(n: int) -> str:
    """As the seed writes them: 8.03B, 524.6M (and 262.1K for small models)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _bytes(n: int) -> str:
    """Decimal units, as the seed writes them: 16.06 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inspect_data(model: LazyModel) -> dict[str, Any]:
    cfg, mem, report = model.config, model.memory_report(), model.verify()
    return {
        "path": str(model.path),
        "files": [str(f) for f in model.checkpoint.files],
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "extra"},
        "memory": {
            "total_params": mem.total_params,
            "float16_bytes": mem.float16_bytes,
            "stored_bytes_by_dtype": mem.stored_bytes_by_dtype,
            "tensor_count": mem.tensor_count,
            "largest": [{"name": n, "params": p} for n, p in mem.largest],
        },
        "verify": {
            "ok": report.ok,
            "missing": list(report.missing),
            "unexpected": list(report.unexpected),
            "mismatched": [
                {"name": n, "expected": list(e), "got": list(g)} for n, e, g in report.mismatched
            ],
            "complete_layers": report.complete_layers,
            "num_layers": report.num_layers,
        },
    }


def _print_inspect(model: LazyModel) -> bool:
    cfg, mem, report = model.config, model.memory_report(), model.verify()
    files = model.checkpoint.files
    found = (
        f"Found model file: {files[0]}"
        if len(files) == 1
        else (f"Found {len(files)} model files (index: {model.checkpoint.index})")
    )
    print(f"Loading Llama model from: {model.checkpoint.root}")
    print(found)
    print("✅ Successfully opened the model (headers only)\n")
    print("📊 Model Configuration:")
    for label, value in (
        ("Model Type", cfg.model_type),
        ("Hidden Size", cfg.hidden_size),
        ("Layers", cfg.num_hidden_layers),
        ("Attention Heads", cfg.num_attention_heads),
        ("Key-Value Heads", cfg.num_key_value_heads),
        ("Vocabulary Size", cfg.vocab_size),
        ("Max Position Embeddings", cfg.max_position_embeddings),
        ("RMS Norm Epsilon", np.format_float_positional(cfg.rms_norm_eps)),
    ):
        print(f"  {label}: {value}")
    print("\n💾 Memory Usage:")
    print(f"  Total Parameters: {_params(mem.total_params)}")
    print(f"  Memory Usage (f16): {_bytes(mem.float16_bytes)}")
    print(f"  Loaded Tensors: {mem.tensor_count}")
    print("\n🔍 Verifying Key Layers:")
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings or "lm_head.weight" in model:
        keys.append("lm_head.weight")
    bad = set(report.missing) | {n for n, _, _ in report.mismatched}
    for name in keys:
        if name in model and name not in bad:
            print(f"  ✅ {name}: {model.tensors[name].numel} params")
        else:
            print(f"  ❌ {name}: {'missing' if name not in model else 'wrong shape'}")
    mark = "✅" if report.complete_layers == report.num_layers else "❌"
    print(f"  {mark} Complete transformer layers: {report.complete_layers}/{report.num_layers}")
    for name in report.missing:
        print(f"  ❌ missing: {name}")
    for name, want, got in report.mismatched:
        print(f"  ❌ {name}: shape {list(got)}, expected {list(want)}")
    for name in report.unexpected:
        print(f"  ⚠️  unexpected: {name}")
    print("\n📈 Large Tensors:")
    for name, n in mem.largest:
        print(f"  • {name}: {_params(n)} params ({n * 2 / 1e6:.1f} MB)")
    if report.ok:
        print("\n✅ Model loading and verification completed!")
    else:
        print("\n❌ Verification failed")
    return report.ok


def _inspect(args: argparse.Namespace) -> int:
    with open_model(args.path) as model:
        if args.json:
            data = _inspect_data(model)
            print(json.dumps(data, indent=2, default=str))
            return 0 if data["verify"]["ok"] else 3
        return 0 if _print_inspect(model) else 3


def _load(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    total = 0
    with open_model(args.path, cache_bytes=args.cache_bytes, concurrency=args.concurrency) as model:
        for _, arr in model.iter_load(progress=False if args.no_progress else None):
            total += arr.nbytes
            del arr
    secs = time.perf_counter() - start
    print(
        f"loaded {total / 1e9:.2f} GB as float16 in {secs:.2f} s: {total / 1e9 / secs:.2f} GB/s, "
        f"peak RSS {_peak_rss_mib():.0f} MiB"
    )
    return 0


def _stream(args: argparse.Namespace) -> int:
    with open_model(args.path, cache_bytes=args.cache_bytes) as model:
        start = last = time.perf_counter()
        for i, layer in model.layers(prefetch=args.prefetch):
            now = time.perf_counter()
            mb = sum(a.nbytes for a in layer.values()) / 1e6
            print(f"layer {i:3d}: {mb:8.1f} MB in {(now - last) * 1e3:7.1f} ms")
            last = now
        print(f"{time.perf_counter() - start:.2f} s in all, peak RSS {_peak_rss_mib():.0f} MiB")
    return 0


def _tokenizer(path: Path) -> Any:
    """The folder's ``tokenizer.json`` through the optional ``tokenizers`` package, or None."""
    file = (path if path.is_dir() else path.parent) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return Tokenizer.from_file(str(file))


def _generate_with(model: LazyModel, ids: list[int], n: int, prefetch: int, tok: Any) -> None:
    from .infer import stream_generate

    start = time.perf_counter()
    new: list[int] = []
    print("new ids:", end="", flush=True)
    for token in stream_generate(model, ids, n, prefetch=prefetch):
        new.append(token)
        print(f" {token}", end="", flush=True)
    secs = time.perf_counter() - start
    print()
    if tok is not None:
        print("text:", tok.decode(new))
    rate = len(new) / secs if secs > 0 else float("inf")
    rss = _peak_rss_mib()
    print(f"{len(new)} tokens in {secs:.2f} s: {rate:.2f} tokens/s, peak RSS {rss:.0f} MiB")


def _generate(args: argparse.Namespace) -> int:
    path = Path(args.path)
    tok = _tokenizer(path)
    if args.prompt is not None:
        if tok is None:
            raise ValueError(
                f"{path}: --prompt needs tokenizer.json in the folder and the tokenizers package"
            )
        ids = list(tok.encode(args.prompt).ids)
    elif args.ids:
        try:
            ids = [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--ids takes comma-separated integers, not {args.ids!r}") from None
    else:
        raise ValueError("give the prompt as --ids 1,2,3 or --prompt TEXT")
    dtype = None if args.dtype == "stored" else args.dtype
    with open_model(path, dtype=dtype, cache_bytes=args.cache_bytes) as model:
        _generate_with(model, ids, args.n, args.prefetch, tok)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_PROMPT, write_demo

    out = Path(args.dir)
    write_demo(out)
    print(f"wrote a demo checkpoint to {out}\n")
    with open_model(out) as model:
        ok = _print_inspect(model)
        print(f"\n🦙 Greedy generation over streamed layers, prompt ids {DEMO_PROMPT}:")
        _generate_with(model, DEMO_PROMPT, 8, 1, None)
    return 0 if ok else 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyllama", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="configuration, memory figures and verification")
    s.add_argument("path", nargs="?", default=DEFAULT_PATH)
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    s.set_defaults(run=_inspect)

    s = sub.add_parser("load", help="read every tensor as float16, report GB/s and peak RSS")
    s.add_argument("path")
    s.add_argument("--cache-bytes", default=DEFAULT_CACHE_BYTES)
    s.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(run=_load)

    s = sub.add_parser("stream", help="walk the decoder layers, timing each")
    s.add_argument("path")
    s.add_argument("--cache-bytes", default="1GiB")
    s.add_argument("--prefetch", type=int, default=1)
    s.set_defaults(run=_stream)

    s = sub.add_parser("generate", help="greedy decoding over streamed layers")
    s.add_argument("path")
    s.add_argument("--ids", help="prompt token ids, comma-separated")
    s.add_argument("--prompt", help="prompt text (needs tokenizer.json and tokenizers)")
    s.add_argument("-n", type=int, default=16, help="new tokens (default 16)")
    s.add_argument(
        "--dtype",
        choices=["stored", "float16"],
        default="stored",
        help="weights as stored (default: BF16 is widened to float32 exactly, without "
        "a conversion on reading) or converted to float16 as they are read",
    )
    s.add_argument("--cache-bytes", default=DEFAULT_CACHE_BYTES)
    s.add_argument("--prefetch", type=int, default=1)
    s.set_defaults(run=_generate)

    s = sub.add_parser("demo", help="write a small Llama-3-shaped checkpoint and inspect it")
    s.add_argument("dir", nargs="?", default=DEMO_DIR)
    s.set_defaults(run=_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except (LazyLlamaError, OSError, ValueError) as e:
        print(f"lazyllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
