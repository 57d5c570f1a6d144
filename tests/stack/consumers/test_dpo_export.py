"""``chatbus dpo export``: records persisted as the feedback app persists them (real MongoDB) become files
that ``datasets`` loads and TRL accepts (its documented columns, ``is_conversational``, one training step)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from chatbus.stack import Stack
from consumers.curation import Preference, TurnState, Vote, build_group
from consumers.dataset import export, parse_since
from core.config import ROOT, Settings
from schemas.feedback import DpoPair, KtoExample, feedback_id, record_document
from schemas.jsonschema import OUT

pytestmark = pytest.mark.stack

FUTURE = 4_000_000_000.0  # records of this test are "voted" in 2096, so --since isolates them from other tests'


def group(n: int, at: float) -> list[DpoPair | KtoExample]:
    """Records of one prompt group with ratings up on a, down on b (an inferred pair, two KTO examples)."""
    pg, conv = f"pg-export-{n}", f"conv-export-{n}"  # fixed: persisting again (each test) upserts the same records
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {n}: how do I reverse a list?"}]
    ids = (f"chatcmpl-export-{n}-a", f"chatcmpl-export-{n}-b")
    texts = (f"Use reversed(xs) or xs[::-1] ({n}).", "You cannot.")
    turns: dict[str, TurnState] = {
        cid: {
            "correlation_id": cid,
            "conversation_id": conv,
            "prompt_group": pg,
            "prompt": prompt,
            "allowed": True,
            "flags": [],
            "text": t,
            "finish_reason": "stop",
            "model": "m",
        }
        for cid, t in zip(ids, texts, strict=True)
    }
    votes: dict[str, Vote] = {
        cid: {
            "feedback_id": feedback_id("rating", "u", cid),
            "response_id": cid,
            "conversation_id": conv,
            "prompt_group": pg,
            "rating": r,
            "user": "u",
            "model": "m",
            "created_at": at,
        }
        for cid, r in zip(ids, ("up", "down"), strict=True)
    }
    preference: Preference | None = None
    return build_group(pg, turns, votes, preference).records


@pytest.fixture
async def persisted(mongo: Any) -> list[DpoPair | KtoExample]:
    records = group(1, FUTURE) + group(2, FUTURE + 100)
    for r in records:
        await mongo["dpo_pairs" if isinstance(r, DpoPair) else "kto_examples"].replace_one({"_id": r.record_id}, record_document(r), upsert=True)
    return records


def test_records_match_their_json_schemas() -> None:
    for r in group(0, 1.0):
        schema = orjson.loads((OUT / f"{r.event_type}.v1.json").read_bytes())
        Draft202012Validator(schema).validate(orjson.loads(r.to_bytes()))


def test_parse_since() -> None:
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2026-11-01") == parse_since("2026-11-01T00:00:00+00:00") == 1_793_491_200.0
    assert parse_since(None) is None
    with pytest.raises(ValueError):
        parse_since("last tuesday")


async def test_jsonl_export_loads_with_datasets_in_trl_columns(settings: Settings, persisted: list[Any], tmp_path: Path) -> None:
    import datasets
    from trl.data_utils import is_conversational

    path, n = await export(settings, "dpo", "jsonl", tmp_path / "dpo.jsonl", since=FUTURE)
    assert n == 2
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert {"prompt", "chosen", "rejected", "record_id", "metadata"} <= set(ds.column_names)
    row = ds[0]
    assert is_conversational(row) and row["chosen"][0]["role"] == "assistant" and row["prompt"][-1]["role"] == "user"
    assert row["metadata"]["source"] == "inferred_from_ratings"
    assert sorted(ds["record_id"]) == sorted(r.record_id for r in persisted if isinstance(r, DpoPair))
    # --since filters by the newest vote behind a record
    _, later = await export(settings, "dpo", "jsonl", tmp_path / "later.jsonl", since=FUTURE + 50)
    assert later == 1
    path, n = await export(settings, "kto", "jsonl", tmp_path / "kto.jsonl", since=FUTURE)
    kto = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert n == 4 and {"prompt", "completion", "label", "record_id", "metadata"} <= set(kto.column_names)
    assert kto.features["label"].dtype == "bool" and sorted(kto["label"]) == [False, False, True, True]
    assert is_conversational(kto[0])


def test_parquet_export_from_the_command_line_and_one_trl_training_step(stack: Stack, persisted: list[Any], tmp_path: Path, tiny_model_dir: Path) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.data_utils import is_conversational

    for kind in ("dpo", "kto"):
        out = tmp_path / f"{kind}.parquet"
        proc = subprocess.run(
            [sys.executable, "-m", "chatbus.cli", "dpo", "export", "--format", "parquet", "--kind", kind, "--since", str(FUTURE), "-o", str(out)],
            env=stack.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith(f"{2 if kind == 'dpo' else 4} {kind} records")
    dpo = datasets.load_dataset("parquet", data_files=str(tmp_path / "dpo.parquet"), split="train", cache_dir=str(tmp_path / "cache"))
    kto = datasets.load_dataset("parquet", data_files=str(tmp_path / "kto.parquet"), split="train", cache_dir=str(tmp_path / "cache"))
    assert is_conversational(dpo[0]) and is_conversational(kto[0])
    assert dpo.features["metadata"]["chosen_reason"].dtype == "string"  # typed even where every row is null

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template, "the tiny model needs a chat template for conversational datasets"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    common: dict[str, Any] = dict(
        max_steps=1, per_device_train_batch_size=2, learning_rate=1e-5, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=128
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "dpo-run"), **common), train_dataset=dpo, processing_class=tokenizer)
    assert trainer.train().global_step == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    kto_trainer = KTOTrainer(model=model, args=KTOConfig(output_dir=str(tmp_path / "kto-run"), **common), train_dataset=kto, processing_class=tokenizer)
    assert kto_trainer.train().global_step == 1
