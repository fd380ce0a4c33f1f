"""Messages API request params as the tests store them in `tasks.params`."""

from __future__ import annotations

from typing import Any

import orjson


def request_params(text: str, *, max_tokens: int = 50, **extra: Any) -> str:
    """The JSON text of a Messages API request whose user message is `text`."""
    return orjson.dumps(
        {
            "model": "claude-haiku-4-5-20251001",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
            **extra,
        }
    ).decode()
