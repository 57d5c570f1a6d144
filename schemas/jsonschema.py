"""Generate JSON Schema (draft 2020-12) files for every event into ``schemas/json/`` (bus events from
:data:`schemas.events.EVENT_TYPES`, feedback and preference records from :data:`schemas.feedback.FEEDBACK_TYPES`).

Run ``python -m schemas.jsonschema`` after changing an event; ``tests/test_schemas.py`` fails while the
committed files differ from what the models produce. Consumers in other languages validate against them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from pydantic import BaseModel

from schemas.events import EVENT_TYPES, SCHEMA_VERSION
from schemas.feedback import FEEDBACK_TYPES

OUT = Path(__file__).resolve().parent / "json"


def render() -> dict[str, bytes]:
    files = {}
    models: dict[str, type[BaseModel]] = {**EVENT_TYPES, **FEEDBACK_TYPES}
    for event_type, model in models.items():
        schema = model.model_json_schema(mode="serialization")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://chatbus.dev/schemas/{event_type}.v{SCHEMA_VERSION}.json",
            **schema,
        }
        files[f"{event_type}.v{SCHEMA_VERSION}.json"] = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return files


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, data in render().items():
        (OUT / name).write_bytes(data)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
