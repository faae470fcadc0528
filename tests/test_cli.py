"""The command line: the seed's report (with the seed's Llama-3-8B figures), JSON, exit codes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lazyllama.cli import main
from lazyllama.config import parse_config
from lazyllama.verify import expected_shapes

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def hollow_checkpoint(outdir: Path, config: dict, shards: int = 4) -> Path:
    """Real headers over sparse files: the shapes of a full model, no data on disk."""
    outdir.mkdir(parents=True, exist_ok=True)
    shapes = list(expected_shapes(parse_config(config, "config")).items())
    per = -(-len(shapes) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shapes[i * per : (i + 1) * per]:
            n = 2
            for d in shape:
                n *= d
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        with open(outdir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (outdir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (outdir / "config.json").write_text(json.dumps(config))
    return outdir


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hollow_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama3-8b", LLAMA3_8B)


def test_inspect_prints_the_seeds_figures(llama3_8b: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(llama3_8b)]) == 0
    out = capsys.readouterr().out
    for line in (
        "Hidden Size: 4096",
        "Layers: 32",
        "Attention Heads: 32",
        "Key-Value Heads: 8",
        "Vocabulary Size: 128256",
        "Max Position Embeddings: 8192",
        "RMS Norm Epsilon: 0.00001",
        "Total Parameters: 8.03B",
        "Memory Usage (f16): 16.06 GB",
        "Loaded Tensors: 291",
        # 128256 × 4096: the seed's example prints 524550144, which no Llama-3 vocabulary gives
        "✅ model.embed_tokens.weight: 525336576 params",
        "✅ model.norm.weight: 4096 params",
        "✅ lm_head.weight: 525336576 params",
        "✅ Complete transformer layers: 32/32",
        "• model.embed_tokens.weight: 525.3M params (1050.7 MB)",
        "• lm_head.weight: 525.3M params (1050.7 MB)",
        "• model.layers.0.mlp.gate_proj.weight: 58.7M params (117.4 MB)",
        "✅ Model loading and verification completed!",
    ):
        assert line in out, line


def test_inspect_json(llama3_8b: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(llama3_8b), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["total_params"] == 8_030_261_248
    assert data["memory"]["float16_bytes"] == 16_060_522_496
    assert data["memory"]["stored_bytes_by_dtype"] == {"BF16": 16_060_522_496}
    assert data["memory"]["tensor_count"] == 291
    assert data["verify"] == {
        "ok": True,
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "complete_layers": 32,
        "num_layers": 32,
    }
    assert data["config"]["rope_theta"] == 500000.0


def test_inspect_reports_a_broken_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = dict(
        LLAMA3_8B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    d = hollow_checkpoint(tmp_path / "m", config, shards=1)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    # Claim one more layer than the files hold, and a wrong width for the embedding.
    (d / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3, vocab_size=99)))
    assert "model.layers.2.mlp.up_proj.weight" not in index["weight_map"]
    assert main(["inspect", str(d)]) == 3
    out = capsys.readouterr().out
    assert "Complete transformer layers: 2/3" in out
    assert "missing: model.layers.2.mlp.up_proj.weight" in out
    assert "model.embed_tokens.weight: shape [100, 64], expected [99, 64]" in out
    assert "Verification failed" in out


def run_lazyllama(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m lazyllama ARGS`` in a process of its own, its output captured."""
    cmd = [sys.executable, "-m", "lazyllama", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_missing_checkpoint_gives_one_line_and_no_traceback(tmp_path: Path) -> None:
    r = run_lazyllama("inspect", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nowhere") in r.stderr


def test_bad_file_gives_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\x05\x00")
    assert main(["load", str(f), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lazyllama: error: ") and str(f) in err and err.count("\n") == 1


def test_default_path_is_the_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["inspect"]) == 1
    assert "models/llama3-8b-instruct" in capsys.readouterr().err


def test_demo_writes_and_inspects(tmp_path: Path) -> None:
    r = run_lazyllama("demo", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "Complete transformer layers: 4/4" in r.stdout
    assert "Found 3 model files" in r.stdout
    assert (tmp_path / "d" / "model.safetensors.index.json").exists()


def test_demo_is_deterministic(tmp_path: Path) -> None:
    for d in ("a", "b"):
        assert main(["demo", str(tmp_path / d)]) == 0
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


def test_load_and_stream(demo_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["load", str(demo_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "peak RSS" in out
    assert main(["stream", str(demo_dir)]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()[:4]] == [
        f"layer {i:3d}" for i in range(4)
    ]


@pytest.mark.parametrize(("flag", "dtype"), [([], None), (["--dtype", "float16"], "float16")])
def test_generate_prints_the_greedy_ids(
    demo_dir: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    flag: list[str],
    dtype: str | None,
) -> None:
    import lazyllama
    import lazyllama.cli
    from lazyllama.infer import generate

    opened: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> lazyllama.LazyModel:
        opened.append(kwargs.get("dtype", "float16"))
        return lazyllama.open(*args, **kwargs)

    monkeypatch.setattr(lazyllama.cli, "open_model", spy)
    assert main(["generate", str(demo_dir), "--ids", "1,791,646", "-n", "5", *flag]) == 0
    assert opened == [dtype]  # BF16 kept as stored unless asked otherwise
    out = capsys.readouterr().out
    printed = [int(x) for x in out.split("new ids:")[1].splitlines()[0].split()]
    with lazyllama.open(demo_dir, dtype=dtype) as model:
        assert printed == generate(model, [1, 791, 646], 5)
    assert "5 tokens in" in out and "tokens/s" in out and "peak RSS" in out


def test_generate_with_a_prompt_and_a_tokenizer(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path / "with-tokenizer"
    d.mkdir()
    for f in demo_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    vocab = {f"w{i}": i for i in range(2048)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = None
    tok.save(str(d / "tokenizer.json"))
    assert main(["generate", str(d), "--prompt", "w1 w791 w646", "-n", "3"]) == 0
    out = capsys.readouterr().out
    ids = [int(x) for x in out.split("new ids:")[1].splitlines()[0].split()]
    assert f"text: {' '.join(f'w{i}' for i in ids)}" in out


@pytest.mark.parametrize("argv", [["--ids", "1,x"], [], ["--prompt", "hello"], ["--ids", "99999"]])
def test_generate_refuses_bad_prompts(
    demo_dir: Path, argv: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert main(["generate", str(demo_dir), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lazyllama: error: ") and err.count("\n") == 1
