"""lazyllama: open Llama safetensors checkpoints lazily, read float16 on first use, within a budget.

model = lazyllama.open("models/Meta-Llama-3-8B", cache_bytes="2GiB")
q = model["model.layers.0.self_attn.q_proj.weight"].load()
for i, layer in model.layers(prefetch=1): ...
"""

from __future__ import annotations

from .cache import CacheStats
from .compat import MultiFileSafeTensorsLoader, SafeTensorsModelLoader, load_llama3_from_safetensors
from .config import LlamaConfig
from .errors import (
    CheckpointError,
    ClosedError,
    Float16OverflowError,
    HeaderError,
    LazyLlamaError,
    ReadError,
    TensorNotFoundError,
    UnsupportedDtypeError,
)
from .format import TensorInfo
from .infer import agenerate, generate, logits, stream_generate
from .model import Float16OverflowWarning, LazyModel, LazyTensor, aopen, open
from .verify import MemoryReport, VerifyReport

__version__ = "0.1.0"

__all__ = [
    "CacheStats",
    "CheckpointError",
    "ClosedError",
    "Float16OverflowError",
    "Float16OverflowWarning",
    "HeaderError",
    "LazyLlamaError",
    "LazyModel",
    "LazyTensor",
    "LlamaConfig",
    "MemoryReport",
    "MultiFileSafeTensorsLoader",
    "ReadError",
    "SafeTensorsModelLoader",
    "TensorInfo",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
    "VerifyReport",
    "__version__",
    "agenerate",
    "aopen",
    "generate",
    "load_llama3_from_safetensors",
    "logits",
    "open",
    "stream_generate",
]
