"""The tiny random-weight model: offline loading with Auto* classes, chat template, idempotent build."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from chatbus.tiny_model import IM_END, PAD, REQUIRED_FILES, build_tiny_model, is_complete


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-model", seed=0)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_a_complete_model(tiny_model_dir: Path) -> None:
    assert is_complete(tiny_model_dir)
    for name in REQUIRED_FILES:
        assert (tiny_model_dir / name).is_file(), name
    readme = (tiny_model_dir / "README.md").read_text(encoding="utf-8").lower()
    assert "random" in readme and "noise" in readme
    assert not list(tiny_model_dir.parent.glob(".tiny-model.tmp-*")), "temporary build dir left behind"


def test_build_is_idempotent(tiny_model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    started = time.perf_counter()
    assert build_tiny_model(tiny_model_dir, seed=0) == tiny_model_dir
    assert time.perf_counter() - started < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_incomplete_dir_is_rebuilt(tmp_path: Path, tiny_model_dir: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a crashed build: not complete
    assert build_tiny_model(target, seed=0) == target
    assert is_complete(target)
    # Same seed (and same vocabulary size) -> identical random weights.
    assert _sha(target / "model.safetensors") == _sha(tiny_model_dir / "model.safetensors")


def test_loads_offline_with_auto_classes(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 4, 2)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 2048
    assert 1000 <= len(tok) <= 4000 and cfg.vocab_size == len(tok)
    assert tok.eos_token == IM_END and tok.pad_token == PAD
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    text = "héllo 東京 🙂 def f(x): return x"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens are atomic

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


def test_chat_template_renders_chatml(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert without.endswith("Hi<|im_end|>\n")
