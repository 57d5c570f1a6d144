"""Feedback on a rerouted turn names the id its answer is recorded under (edge.feedback.as_recorded)."""

from __future__ import annotations

from edge.conversations import TurnInfo
from edge.feedback import FeedbackRequest, as_recorded


def info(cid: str) -> TurnInfo:
    return TurnInfo(cid, "conv", "group", "m", "stop")


def test_a_rerouted_turns_id_becomes_the_recorded_one_and_others_stay() -> None:
    moved = {"chatcmpl-a": "chatcmpl-a2"}
    rating = FeedbackRequest(type="rating", response_id="chatcmpl-a", rating="up")
    req, turns = as_recorded(rating, {"chatcmpl-a": info("chatcmpl-a")}, lambda c: moved.get(c, c))
    assert req.response_id == "chatcmpl-a2" and req.rating == "up" and list(turns) == ["chatcmpl-a2"]
    pref = FeedbackRequest(type="preference", chosen_id="chatcmpl-b", rejected_id="chatcmpl-a")
    req, turns = as_recorded(pref, {"chatcmpl-b": info("chatcmpl-b"), "chatcmpl-a": info("chatcmpl-a")}, lambda c: moved.get(c, c))
    assert (req.chosen_id, req.rejected_ids) == ("chatcmpl-b", ["chatcmpl-a2"]) and set(turns) == {"chatcmpl-b", "chatcmpl-a2"}
    same = FeedbackRequest(type="rating", response_id="chatcmpl-c", rating="down")
    assert as_recorded(same, {"chatcmpl-c": info("chatcmpl-c")}, lambda c: moved.get(c, c))[0] is same
