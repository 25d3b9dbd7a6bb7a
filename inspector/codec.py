"""JSON on the wire: orjson behind two functions; pydantic validates only at the boundary."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel


def dumps(message: BaseModel) -> bytes:
    return orjson.dumps(message.model_dump(), option=orjson.OPT_UTC_Z)


def loads(data: bytes) -> Any:
    return orjson.loads(data)
