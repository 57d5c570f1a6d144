"""Workarounds for aiokafka protocol gaps against Kafka 4.x brokers.

aiokafka 0.14's ``AIOKafkaAdminClient.describe_consumer_groups`` negotiates DescribeGroups v3 but
decodes the answer with the v2 response schema (v3 adds ``authorized_operations``), which fails with
"Buffer underrun decoding string". :func:`describe_groups` caps the request at v2, whose request and
response schemas aiokafka has right, and returns plain dicts.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DescribeGroupsRequest_v0, DescribeGroupsRequest_v1, DescribeGroupsRequest_v2
from aiokafka.protocol.api import Request


class DescribeGroupsV2(Request[DescribeGroupsRequest_v0 | DescribeGroupsRequest_v1 | DescribeGroupsRequest_v2]):
    API_KEY = 15

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(self, request_struct_class: type[Any]) -> Any:
        return request_struct_class(self._groups)


async def describe_groups(admin: AIOKafkaAdminClient, group_ids: list[str]) -> dict[str, dict[str, Any]]:
    """``{group_id: {"state": str, "members": int}}`` for each group (state "Dead" if unknown)."""
    out: dict[str, dict[str, Any]] = {}
    for gid in group_ids:
        node = await admin.find_coordinator(gid)
        resp = await admin._client.send(node, DescribeGroupsV2([gid]))
        for g in resp.to_object()["groups"]:
            out[g["group"]] = {"state": g["state"], "members": len(g["members"])}
    return out
