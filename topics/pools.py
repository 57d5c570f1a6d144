"""Model pools: each served model has inference workers of its own, reading topics of its own in a
consumer group of its own, so models scale and fail independently.

The primary model (``CHATBUS_MODEL``) keeps the plain names: ``chat.grounded`` / ``batch.grounded`` read by
``chatbus-inference``. Each model of ``CHATBUS_EXTRA_MODELS`` gets ``chat.grounded.<pool>`` /
``batch.grounded.<pool>`` read by ``chatbus-inference.<pool>``, ``<pool>`` being its served name made safe
for a topic name. Safety and retrieval are shared: the retrieval worker sends a grounded turn to the pool
of the model the turn names (the edge chose it, :mod:`edge.routing`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache

from core.catalogue import resolve
from core.config import Settings
from topics.registry import BATCH_GROUNDED, CHAT_GROUNDED, INFERENCE, GroupSpec, TopicSpec, spec

_UNSAFE = re.compile(r"[^a-z0-9._-]+")


@dataclass(frozen=True)
class ModelPool:
    name: str  # the served model name clients ask for
    model: str  # what its workers load: a packaged short name, a Hugging Face id or a path
    primary: bool = False

    @property
    def slug(self) -> str:
        return _UNSAFE.sub("-", self.name.lower()).strip("-.") or "model"

    @property
    def suffix(self) -> str:
        return "" if self.primary else f".{self.slug}"

    @property
    def group(self) -> GroupSpec:
        """Its inference consumer group (the primary's is :data:`topics.registry.INFERENCE`)."""
        if self.primary:
            return INFERENCE
        return GroupSpec(INFERENCE.group_id + self.suffix, (CHAT_GROUNDED + self.suffix, BATCH_GROUNDED + self.suffix))

    def grounded(self, source: str = "chat") -> str:
        """Registry-style name of the pool's grounded topic for a turn's lane (``source`` ``batch`` or other)."""
        return (BATCH_GROUNDED if source == "batch" else CHAT_GROUNDED) + self.suffix

    @property
    def service(self) -> str:
        """The local stack's service name of its (first) worker."""
        return "inference" if self.primary else f"inference.{self.slug}"


def parse_pairs(value: str) -> dict[str, str]:
    """``"a=b, c=d"`` -> ``{"a": "b", "c": "d"}`` (blank items skipped). Raises ValueError on an item without ``=``."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in value.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ValueError(f"expected name=value, got {item!r}")
        out[key.strip()] = val.strip()
    return out


@cache
def _pools(primary_name: str, primary_model: str, extra: str, build_dir: str) -> tuple[ModelPool, ...]:
    from pathlib import Path

    out = [ModelPool(primary_name, primary_model, primary=True)]
    for item in (i.strip() for i in extra.split(",")):
        if not item:
            continue
        name, sep, model = item.partition("=")
        if not sep:
            model, name = item, resolve(item, Path(build_dir)).served_name
        pool = ModelPool(name.strip(), model.strip())
        if any(p.name == pool.name or p.slug == pool.slug for p in out):
            raise ValueError(f"CHATBUS_EXTRA_MODELS: {pool.name!r} is served twice")
        out.append(pool)
    return tuple(out)


def pools(settings: Settings) -> tuple[ModelPool, ...]:
    """Every served model's pool, the primary first. Raises ValueError on a bad ``CHATBUS_EXTRA_MODELS``."""
    return _pools(settings.model_name, settings.model, settings.extra_models, str(settings.build_dir))


def pool_named(settings: Settings, name: str) -> ModelPool | None:
    return next((p for p in pools(settings) if p.name == name), None)


def primary(settings: Settings) -> ModelPool:
    return pools(settings)[0]


def own_pool(settings: Settings) -> ModelPool:
    """The pool an inference worker with these settings serves: the one named by its served model name,
    else the primary (a worker started with other settings than the rest of the deployment)."""
    return pool_named(settings, settings.model_name) or primary(settings)


def pool_topic_specs(settings: Settings) -> list[TopicSpec]:
    """The extra pools' grounded topics, configured as the primary's."""
    out: list[TopicSpec] = []
    for pool in pools(settings)[1:]:
        for name in (CHAT_GROUNDED, BATCH_GROUNDED):
            base = spec(name)
            out.append(replace(base, name=name + pool.suffix, purpose=f"{base.purpose} (model {pool.name})"))
    return out
