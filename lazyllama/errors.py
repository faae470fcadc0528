"""The errors lazyllama raises: one tree, each class also a builtin a caller would catch.

    LazyLlamaError(Exception)
    ├─ HeaderError(ValueError)            bad length, not UTF-8, not JSON, bad entry, bad offsets
    ├─ UnsupportedDtypeError(TypeError)   "Unsupported tensor dtype"
    ├─ CheckpointError(FileNotFoundError) "config.json not found", "No safetensors file found",
    │                                     an index naming a missing shard or one outside the folder
    ├─ TensorNotFoundError(KeyError)
    ├─ ReadError(OSError)                 short read, file changed or truncated under us
    ├─ Float16OverflowError(OverflowError) values too large for float16, on_overflow="raise"
    └─ ClosedError(RuntimeError)          a model used after close()

Every message names the file, and the tensor where there is one.
"""

from __future__ import annotations

import os

__all__ = [
    "CheckpointError",
    "ClosedError",
    "Float16OverflowError",
    "HeaderError",
    "LazyLlamaError",
    "ReadError",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
]


class LazyLlamaError(Exception):
    """Root of every error lazyllama raises on purpose."""


class HeaderError(LazyLlamaError, ValueError):
    """A safetensors header (or index, or config) that breaks a rule of the format."""


class UnsupportedDtypeError(LazyLlamaError, TypeError):
    """A dtype the file names that cannot be read or converted as asked."""


class CheckpointError(LazyLlamaError, FileNotFoundError):
    """A checkpoint folder that lacks a file it needs or names one it must not use."""


class TensorNotFoundError(LazyLlamaError, KeyError):
    """A tensor name the checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class ReadError(LazyLlamaError, OSError):
    """Bytes that could not be read as the header promised: short read, file changed."""


class Float16OverflowError(LazyLlamaError, OverflowError):
    """Values too large for float16, raised when ``on_overflow="raise"``."""


class ClosedError(LazyLlamaError, RuntimeError):
    """A model used after ``close()``."""


def where(path: str | os.PathLike[str], tensor: str | None = None) -> str:
    """The ``file`` / ``file, tensor`` prefix every message starts with."""
    return f"{os.fspath(path)}: {tensor!r}: " if tensor is not None else f"{os.fspath(path)}: "
