"""The edge's writes of a chat turn: the request on ``chat.requests`` and its cancel on ``chat.control``
(both keyed by conversation id, so a turn's events stay in order), and the ``reply_to`` an edge instance
puts in its requests (its partition of ``chat.replies``)."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from core.config import Settings
from producers.bus import Outgoing
from schemas.events import CancelTurn, ChatTurnRequest, EdgeHeartbeat, ReplyTo
from topics.registry import CHAT_CONTROL, CHAT_REPLIES, CHAT_REQUESTS, topic


def edge_reply_to(settings: Settings) -> ReplyTo:
    """Where this edge instance reads the replies to its turns."""
    return ReplyTo(topic=topic(CHAT_REPLIES, settings.topic_prefix), partition=settings.reply_partition)


class TurnProducer:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.requests_topic = topic(CHAT_REQUESTS, settings.topic_prefix)
        self.control_topic = topic(CHAT_CONTROL, settings.topic_prefix)

    def request(self, turn: ChatTurnRequest) -> Outgoing:
        """The turn's ``chat.requests`` record (serialised now: validated input always serialises)."""
        return Outgoing(self.requests_topic, turn.to_bytes(), key=turn.key)

    async def send(self, out: Outgoing) -> None:
        """Produce one record and wait for its acknowledgement."""
        await self.producer.send_and_wait(out.topic, out.value, key=out.key, partition=out.partition)

    async def heartbeat(self, edge_id: str, reply_partition: int, watching: list[str]) -> EdgeHeartbeat:
        """Publish ``chat.edge.heartbeat`` (acknowledged); returns the event."""
        ev = EdgeHeartbeat(correlation_id=f"edge:{edge_id}", conversation_id=edge_id, edge_id=edge_id, reply_partition=reply_partition, watching=watching)
        await self.producer.send_and_wait(self.control_topic, ev.to_bytes(), key=ev.key)
        return ev

    async def cancel(self, correlation_id: str, conversation_id: str, reason: str) -> CancelTurn:
        """Publish ``chat.turn.cancel`` (acknowledged); returns the event."""
        ev = CancelTurn(correlation_id=correlation_id, conversation_id=conversation_id, reason=reason)
        await self.producer.send_and_wait(self.control_topic, ev.to_bytes(), key=ev.key)
        return ev
