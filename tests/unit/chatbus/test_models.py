"""Packaged models: name resolution, provisioning's checks (on small wheels built here), prompt fitting.

The real wheels are ~570 MB; provisioning's checks are proven on wheels of a few KB that this module
writes, with the same code path (zip members concatenated, sizes and sha256 checked, marker last). The
real conversion runs in ``make setup`` and is exercised by ``test_real_model.py``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from chatbus import models
from chatbus.models import ProvisionError, assemble_gguf, provision, verify_wheels
from core.catalogue import CATALOGUE, DEFAULT_MODEL, MARKER, PackagedModel, WheelPart, is_provisioned, packaged, resolve
from core.config import Settings
from core.grounding import assemble
from inference_workers.engines.base import end_of_turn_id, fit_prompt, sampling_defaults
from inference_workers.prompt_budget import fit_grounded, prompt_budget
from schemas.events import ChatMessage, ChatTurnRequest, GroundedTurn, Passage, ReplyTo, RetrievalResult, SafetyVerdict


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_model(tmp: Path, chunks: list[bytes]) -> tuple[PackagedModel, Path]:
    """Wheels holding ``chunks`` (one member each) in ``tmp/wheels``, and a catalogue entry pinning them."""
    wheels = tmp / "wheels"
    wheels.mkdir()
    parts = []
    for i, data in enumerate(chunks, 1):
        part = WheelPart(f"fake-part{i}", "1.0", "", f"fake_part{i}/data/part{i:02d}.bin", len(data))
        with zipfile.ZipFile(wheels / part.filename, "w") as z:
            z.writestr(part.member, data)
        sha = _sha((wheels / part.filename).read_bytes())
        parts.append(WheelPart(part.package, part.version, sha, part.member, part.size))
    model = PackagedModel(
        name="fake-model",
        aliases=("fake",),
        upstream="none/fake",
        licence="none",
        parts=tuple(parts),
        gguf_sha256=_sha(b"".join(chunks)),
        eos_tokens=("<|im_end|>",),
        temperature=0.7,
        top_p=0.8,
    )
    return model, wheels


def test_resolve_short_names_and_paths(tmp_path: Path) -> None:
    default = resolve("", tmp_path)
    assert default.packaged is not None and default.packaged.name == DEFAULT_MODEL
    assert default.path == str(tmp_path / "models" / DEFAULT_MODEL) and default.served_name == DEFAULT_MODEL
    smol = resolve("SmolLM2-135M", tmp_path)
    assert smol.packaged is CATALOGUE["smollm2-135m-instruct"] and smol.served_name == "smollm2-135m-instruct"
    tiny = resolve("tiny", tmp_path)
    assert tiny.tiny and tiny.path == str(tmp_path / "tiny-model") and "random" in tiny.served_name
    hub = resolve("Qwen/Qwen2.5-7B-Instruct", tmp_path)
    assert hub.packaged is None and hub.path == "Qwen/Qwen2.5-7B-Instruct" and hub.served_name == "Qwen2.5-7B-Instruct"
    assert packaged("no-such-model") is None
    s = Settings(build_dir=tmp_path, model="smollm2")
    assert s.resolved_model == str(tmp_path / "models" / "smollm2-135m-instruct") and s.model_name == "smollm2-135m-instruct"
    assert Settings(build_dir=tmp_path, model="smollm2", served_model_name="x").model_name == "x"


def test_every_catalogue_wheel_is_pinned_by_hash() -> None:
    for model in CATALOGUE.values():
        assert len(model.gguf_sha256) == 64
        for part in model.parts:
            assert len(part.sha256) == 64 and part.version and part.size > 0


def test_assemble_concatenates_in_order_and_checks_the_hash(tmp_path: Path) -> None:
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 100, b"tail"]
    model, wheels = _fake_model(tmp_path, chunks)
    verify_wheels(model.parts, wheels)
    out = assemble_gguf(model, wheels, tmp_path / "m.gguf")
    assert out.read_bytes() == b"".join(chunks)


def test_a_truncated_part_names_its_wheel(tmp_path: Path) -> None:
    model, wheels = _fake_model(tmp_path, [b"a" * 1000, b"b" * 1000])
    short = WheelPart(model.parts[1].package, "1.0", model.parts[1].sha256, model.parts[1].member, 2000)
    broken = replace(model, parts=(model.parts[0], short))
    with pytest.raises(ProvisionError, match=r"fake_part2-1\.0-py3-none-any\.whl.*1000 bytes, expected 2000"):
        assemble_gguf(broken, wheels, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_hash_mismatch_names_the_file_and_both_hashes(tmp_path: Path) -> None:
    model, wheels = _fake_model(tmp_path, [b"a" * 1000])
    wrong = replace(model, gguf_sha256="0" * 64)
    with pytest.raises(ProvisionError) as err:
        assemble_gguf(wrong, wheels, tmp_path / "m.gguf")
    assert "m.gguf" in str(err.value) and "0" * 64 in str(err.value) and model.gguf_sha256 in str(err.value)
    assert not (tmp_path / "m.gguf").exists()
    (wheels / model.parts[0].filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(ProvisionError, match=f"expected {model.parts[0].sha256}, got {_sha(b'not the pinned wheel')}"):
        verify_wheels(model.parts, wheels)


def test_a_full_disk_is_reported_with_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, wheels = _fake_model(tmp_path, [b"a" * 1000])
    target = tmp_path / "m.gguf"
    real_open = Path.open

    class FullDisk:  # the one file this test writes fails as a full disk does
        def __init__(self) -> None:
            self.file = real_open(target, "wb")

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk() if self == target else real_open(self, *a, **k))
    with pytest.raises(ProvisionError, match=r"m\.gguf: disk full \(this step needs about 0 MB free\)"):
        assemble_gguf(model, wheels, target)
    assert not target.exists()


def test_provision_skips_a_complete_folder_and_rebuilds_an_incomplete_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, wheels = _fake_model(tmp_path, [b"GGUF" * 100])
    build = tmp_path / "build"
    calls: list[str] = []

    def fake_convert(m: PackagedModel, gguf: Path, out: Path) -> None:  # the transformers step, stubbed here only
        calls.append(gguf.read_bytes()[:4].decode())
        (out / "config.json").write_text("{}")

    def fake_download(parts: tuple[WheelPart, ...], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for p in parts:
            (dest / p.filename).write_bytes((wheels / p.filename).read_bytes())

    monkeypatch.setattr(models, "convert", fake_convert)
    monkeypatch.setattr(models, "_pip_download", fake_download)
    [folder] = provision([model], build, echo=lambda _: None)
    assert calls == ["GGUF"] and is_provisioned(model, build / "models")
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"] == model.gguf_sha256
    assert not (folder / "model.gguf").exists() and not (build / "models" / "fake-model.partial").exists()
    provision([model], build, echo=lambda _: None)
    assert calls == ["GGUF"], "a complete folder is left alone"
    (folder / MARKER).unlink()
    provision([model], build, echo=lambda _: None)
    assert calls == ["GGUF", "GGUF"], "a folder without its marker is rebuilt"


def test_a_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, wheels = _fake_model(tmp_path, [b"GGUF" * 100])
    build = tmp_path / "build"

    def broken_convert(m: PackagedModel, gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "convert", broken_convert)
    monkeypatch.setattr(models, "_pip_download", lambda parts, dest: None)
    (build / "model-wheels").mkdir(parents=True)
    for p in model.parts:
        (build / "model-wheels" / p.filename).write_bytes((wheels / p.filename).read_bytes())
    with pytest.raises(ProvisionError, match="disk full"):
        provision([model], build, echo=lambda _: None)
    assert not (build / "models" / "fake-model").exists() and not (build / "models" / "fake-model.partial").exists()


# --- engine helpers on the tiny model's real tokenizer ------------------------------------------------------


def test_end_of_turn_token_comes_from_the_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_sampling_defaults_follow_the_generation_config() -> None:
    from transformers import GenerationConfig

    assert sampling_defaults(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8)) == (0.7, 0.8)
    assert sampling_defaults(GenerationConfig()) == (1.0, 1.0)  # greedy config: OpenAI's defaults
    assert sampling_defaults(None) == (1.0, 1.0)


def _render_words(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in chat template: one token per word plus 2 per message (unit tests of the fitting only)."""
    return [0] * sum(len(m["content"].split()) + 2 for m in messages)


def test_fit_prompt_honours_the_prefill_budget() -> None:
    msgs = [{"role": "system", "content": "s " * 10}] + [{"role": "user" if i % 2 == 0 else "assistant", "content": "w " * 50} for i in range(9)]
    ids, max_new = fit_prompt(msgs, _render_words, max_model_len=4096, max_tokens=64)
    assert len(ids) == 12 + 9 * 52 and max_new == 64  # fits the context: untouched
    ids, max_new = fit_prompt(msgs, _render_words, max_model_len=4096, max_tokens=64, max_prompt_tokens=200)
    assert len(ids) == 12 + 3 * 52 and max_new == 64  # the oldest turns went, system and the last three stay


def _turn(passages: list[Passage], history: int = 0) -> GroundedTurn:
    messages = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content="old turn " * 30) for i in range(history)]
    messages.append(ChatMessage(role="user", content="How do I write JSON to a file?"))
    request = ChatTurnRequest(correlation_id="c", conversation_id="v", model="m", messages=messages, reply_to=ReplyTo(topic="chat.replies", partition=0))
    prompt, citations = assemble(messages, passages)
    return GroundedTurn(
        correlation_id="c",
        conversation_id="v",
        request=request,
        verdict=SafetyVerdict(allowed=True, policy_version="test", latency_ms=0),
        retrieval=RetrievalResult(status="ok", passages=passages),
        prompt_messages=prompt,
        citations=citations,
    )


def test_fit_grounded_drops_the_lowest_ranked_passages_first() -> None:
    passages = [Passage(chunk_id=str(i), text="word " * 100, source=f"p{i}.html", position=i, score=1 - i / 10) for i in range(4)]
    turn = _turn(passages)
    full = len(_render_words([m.model_dump() for m in turn.prompt_messages]))

    def count(m: list[dict[str, str]]) -> int:
        return len(_render_words(m))

    messages, cites = fit_grounded(turn, count, budget=full)
    assert [c.index for c in cites] == [1, 2, 3, 4]
    messages, cites = fit_grounded(turn, count, budget=full - 50)
    assert [c.source for c in cites] == ["p0.html", "p1.html", "p2.html"] and "p3.html" not in messages[0]["content"]
    messages, cites = fit_grounded(turn, count, budget=10)  # nothing fits: the best passage stays
    assert [c.index for c in cites] == [1] and "p0.html" in messages[0]["content"]
    messages, cites = fit_grounded(turn, lambda m: None, budget=10)  # an engine that cannot count
    assert len(cites) == 4


def test_prompt_budget_is_the_smaller_of_prefill_and_context() -> None:
    assert prompt_budget(1024, 2048, 256) == 1024
    assert prompt_budget(1024, 1024, 256) == 768
    assert prompt_budget(0, 2048, 4096) == 1024  # completion counted as at most half the context
