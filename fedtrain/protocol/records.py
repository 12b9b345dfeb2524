"""fedtrain messages as Flower records: a JSON header in a ConfigRecord, payloads as raw
uint8 Arrays in an ArrayRecord (Flower moves them in content-addressed chunks; the bytes are
passed through untouched, no numpy serialisation). No torch import here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

__all__ = ["from_content", "to_content"]


def to_content(header: dict[str, Any], blobs: Mapping[str, bytes | bytearray]) -> RecordDict:
    content = RecordDict({"fedtrain": ConfigRecord({"header": json.dumps(header)})})
    if blobs:
        arrays = ArrayRecord()
        for name, data in blobs.items():
            raw = data if isinstance(data, bytes) else bytes(data)
            arrays[name] = Array(dtype="uint8", shape=(len(raw),), stype="raw", data=raw)
        content["blobs"] = arrays
    return content


def from_content(content: RecordDict) -> tuple[dict[str, Any], dict[str, bytes]]:
    if "fedtrain" not in content:
        raise ValueError("not a fedtrain message (no 'fedtrain' header record)")
    header = json.loads(str(content["fedtrain"]["header"]))
    blobs: dict[str, bytes] = {}
    if "blobs" in content:
        for name, arr in content["blobs"].items():
            if not isinstance(arr, Array):
                raise ValueError(f"blob {name!r} is not an array")
            blobs[name] = bytes(arr.data)
    return header, blobs
