"""A small, deterministic Llama-3-shaped checkpoint: BF16, sharded with an index, one decoder
layer split across two shards, as real checkpoints are."""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np

from .config import parse_config
from .verify import expected_shapes
from .writer import save_checkpoint

__all__ = ["DEMO_CONFIG", "DEMO_PROMPT", "write_demo"]

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
}
DEMO_PROMPT = [1, 791, 646, 315, 1917]
# Three shards: at this size layer 1 starts in the first shard and ends in the second.
DEMO_SHARD_BYTES = 1_000_000


def write_demo(outdir: str | os.PathLike[str], seed: int = 0) -> list[str]:
    """Write the demo checkpoint into ``outdir``; the same bytes every time for one seed."""
    config = parse_config(DEMO_CONFIG, "demo config")
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:  # norms: near one
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * (shape[-1] ** -0.5)
        tensors[name] = values.astype(ml_dtypes.bfloat16)
    return save_checkpoint(tensors, outdir, DEMO_CONFIG, DEMO_SHARD_BYTES)
