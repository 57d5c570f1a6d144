"""The recorder's lag at a steady interactive rate: one-by-one writes against bulk writes, in one run.

Starts Kafka and FerretDB of its own (a fresh state folder, free ports; the local stack is not touched)::

    .venv/bin/python bench/recorder.py [--turns-per-s 7] [--seconds 30] [--tokens 60]

What it does, for each mode (``one-by-one``: three upserts per event; ``bulk``: one ordered ``bulk_write``
per collection per fetched batch, token events dropped before validation — :mod:`consumers.recorder`):

* a producer publishes synthetic turns at ``--turns-per-s`` for ``--seconds``: each turn is what the
  pipeline writes — a request on ``chat.requests``, a screened turn, a grounded turn, ``--tokens`` token
  events and the completion on ``chat.replies`` — under a topic prefix of the mode's own;
* the recorder (the worker's own consumer, in this process) records them into FerretDB;
* every 0.5 s the recorder group's **consumer lag** (records produced, not yet committed) is read; lag in
  seconds is that divided by the production rate (records/s). Reported: p50/p99/max lag (s) and the time
  from the end of production to the recorder having caught up.

Writes ``bench/results/recorder.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaProducer  # noqa: E402

from chatbus.stack import Stack, free_port  # noqa: E402
from consumers.recorder import Recorder, recorder_worker  # noqa: E402
from core.config import Settings  # noqa: E402
from producers.replies import token_event  # noqa: E402
from schemas.events import ChatMessage, ChatTurnRequest, GroundedTurn, ReplyTo, RetrievalResult, SafetyVerdict, ScreenedTurn, TurnCompleted, Usage  # noqa: E402
from topics.clients import ensure_topics  # noqa: E402
from topics.lag import LagReader  # noqa: E402
from topics.registry import CHAT_GROUNDED, CHAT_REPLIES, CHAT_REQUESTS, CHAT_SCREENED, RECORDER, topic  # noqa: E402

OUT = ROOT / "bench" / "results"


def turn_events(prefix: str, tokens: int) -> list[tuple[str, bytes, bytes]]:
    """(topic, key, value) of one synthetic turn, in pipeline order."""
    cid, conv = f"chatcmpl-{uuid.uuid4().hex}", f"conv-{uuid.uuid4().hex}"
    reply = ReplyTo(topic=topic(CHAT_REPLIES, prefix), partition=0)
    request = ChatTurnRequest(
        correlation_id=cid, conversation_id=conv, model="bench", messages=[ChatMessage(role="user", content="How do I sort a list in Python?")], reply_to=reply
    )
    verdict = SafetyVerdict(allowed=True, category="none", score=0.1, policy_version="bench", latency_ms=1.0)
    screened = ScreenedTurn(correlation_id=cid, conversation_id=conv, request=request, verdict=verdict)
    grounded = GroundedTurn(
        correlation_id=cid, conversation_id=conv, request=request, verdict=verdict, retrieval=RetrievalResult(status="ok"), prompt_messages=request.messages
    )
    key = conv.encode()
    out = [(topic(CHAT_REQUESTS, prefix), key, request.to_bytes()), (topic(CHAT_SCREENED, prefix), key, screened.to_bytes())]
    out.append((topic(CHAT_GROUNDED, prefix), key, grounded.to_bytes()))
    text = ""
    for i in range(tokens):
        piece = f"word{i} "
        out.append((reply.topic, key, token_event(request, attempt="a", seq=i, delta=piece, text_offset=len(text)).to_bytes()))
        text += piece
    done = TurnCompleted(
        correlation_id=cid, conversation_id=conv, attempt="a", seq=tokens, finish_reason="stop", text=text, model="bench", usage=Usage(completion_tokens=tokens)
    )
    out.append((reply.topic, key, done.to_bytes()))
    return out


async def run_mode(settings: Settings, bulk: bool, rate: float, seconds: float, tokens: int) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    s = settings.model_copy(update={"topic_prefix": prefix, "mongo_db": f"bench_{prefix[:-1]}"})
    await ensure_topics(s)
    recorder = Recorder(s)
    worker = recorder_worker(s, recorder, bulk=bulk)
    stop = asyncio.Event()
    runner = asyncio.create_task(worker.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=5)
    await producer.start()
    reader = LagReader(s)
    await reader.start()
    groups = {RECORDER.group_id: tuple(topic(t, prefix) for t in RECORDER.topics)}
    per_turn = 4 + tokens
    samples: list[float] = []
    produced = 0

    async def sample() -> int:
        lag = sum((await reader.read(groups)).values())
        samples.append(lag / (rate * per_turn))
        return lag

    started = time.monotonic()
    next_sample = started
    turn = 0
    while time.monotonic() - started < seconds:
        due = started + turn / rate
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        for name, key, value in turn_events(prefix, tokens):
            await producer.send(name, value, key=key)
        produced += per_turn
        turn += 1
        if time.monotonic() >= next_sample:
            next_sample += 0.5
            await sample()
    await producer.flush()
    ended = time.monotonic()
    while await sample() > 0 and time.monotonic() - ended < 300:
        await asyncio.sleep(0.5)
    caught_up_s = time.monotonic() - ended
    stop.set()
    await runner
    await producer.stop()
    await reader.stop()
    recorded = await recorder.db["turns"].count_documents({"answer": {"$exists": True}})
    await recorder.client.close()
    ordered = sorted(samples)
    return {
        "mode": "bulk" if bulk else "one-by-one",
        "turns": turn,
        "records": produced,
        "recorded_turns": recorded,
        "lag_p50_s": round(statistics.median(ordered), 2),
        "lag_p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        "lag_max_s": round(ordered[-1], 2),
        "caught_up_after_s": round(caught_up_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns-per-s", type=float, default=7.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, default=60, help="token events per turn (the recorder skips them, but reads them)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="chatbus-bench-recorder-"))
    settings = Settings(
        state_dir=state,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
    )
    stack = Stack(settings)
    stack.up(("kafka", "ferretdb"), wait=False)
    try:
        rows = [asyncio.run(run_mode(settings, bulk, args.turns_per_s, args.seconds, args.tokens)) for bulk in (False, True)]
    finally:
        stack.down()
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"turns_per_s": args.turns_per_s, "seconds": args.seconds, "tokens_per_turn": args.tokens, "rows": rows}
    (OUT / "recorder.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Recorder lag at {args.turns_per_s:g} turns/s for {args.seconds:g} s ({args.tokens} token events per turn), Kafka + FerretDB on this machine:",
        "",
        "| mode | turns | recorded | lag p50 (s) | lag p99 (s) | lag max (s) | caught up after (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['turns']} | {r['recorded_turns']} | {r['lag_p50_s']} | {r['lag_p99_s']} | {r['lag_max_s']} | {r['caught_up_after_s']} |"
        )
    (OUT / "recorder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
