"""Create-body validation as the real API does it (spec §3).

Two levels, and the difference matters to clients:

- the envelope (`requests`, `custom_id`, the JSON itself) is checked synchronously and a
  problem rejects the whole create with a 400 whose message is the captured one (§3.3);
- `params` are NOT checked synchronously: a bad request is accepted and becomes an
  `errored` result line when the batch ends (§3.3 "Asynchronous failures").

Only compact facts about each request are kept (never the params dicts), so a
100,000-request, 256 MB body does not stay in memory after create.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from batchd.api.wire import CUSTOM_ID_PATTERN, MAX_REQUESTS_PER_BATCH

# Enough of the last user message to prove which request a result belongs to.
MAX_TEXT_CHARS = 2048
# (error type, message) of a request that will come back `errored`.
RequestError = tuple[str, str]


class CreateRejected(Exception):
    """The whole create is refused with this status and message (§3.3)."""

    def __init__(
        self, message: str, *, status: int = 400, error_type: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type


@dataclass
class ParsedRequests:
    """Column-wise facts about the accepted requests, one entry per request."""

    custom_ids: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    max_tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    input_bytes: list[int] = field(default_factory=list)
    # Sparse: index -> the asynchronous validation error of that request.
    errors: dict[int, RequestError] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.custom_ids)


def parse_create_body(
    body: bytes | bytearray, models: frozenset[str] = frozenset()
) -> ParsedRequests:
    """Validate a create body; raise CreateRejected with the real API's message."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CreateRejected(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        # UNCONFIRMED: the message for a JSON body that is not an object.
        raise CreateRejected("Input should be a valid dictionary or object to extract fields from")
    for key in document:
        if key != "requests":
            # UNCONFIRMED for the top level; the style is captured for params (§3.3).
            raise CreateRejected(f"{key}: Extra inputs are not permitted")
    requests = document.get("requests")
    if "requests" not in document:
        raise CreateRejected("requests: Field required")
    if not isinstance(requests, list):
        raise CreateRejected("requests: Input should be a valid list")
    if not requests:
        raise CreateRejected("requests: List should have at least 1 item after validation, not 0")
    if len(requests) > MAX_REQUESTS_PER_BATCH:
        # UNCONFIRMED: only maxItems is documented (§3.3); pydantic's wording for it.
        raise CreateRejected(
            f"requests: List should have at most {MAX_REQUESTS_PER_BATCH} items after "
            f"validation, not {len(requests)}"
        )
    parsed = ParsedRequests()
    interned: dict[str, str] = {}
    for index, item in enumerate(requests):
        custom_id, params = _check_envelope(index, item)
        _add_request(parsed, custom_id, params, models, interned)
    _check_unique(parsed.custom_ids)
    return parsed


def _check_envelope(index: int, item: object) -> tuple[str, dict[str, object]]:
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise CreateRejected(f"{where}: Input should be a valid dictionary")
    if "custom_id" not in item:
        raise CreateRejected(f"{where}.custom_id: Field required")
    custom_id = item["custom_id"]
    if not isinstance(custom_id, str):
        raise CreateRejected(f"{where}.custom_id: Input should be a valid string")
    if not custom_id:
        # UNCONFIRMED: pydantic's min_length wording, in the style of the captured max.
        raise CreateRejected(f"{where}.custom_id: String should have at least 1 character")
    if len(custom_id) > 64:
        raise CreateRejected(f"{where}.custom_id: String should have at most 64 characters")
    if not CUSTOM_ID_PATTERN.fullmatch(custom_id):
        raise CreateRejected(
            f"{where}.custom_id: String should match pattern '{CUSTOM_ID_PATTERN.pattern}'"
        )
    if "params" not in item:
        raise CreateRejected(f"{where}.params: Field required")  # UNCONFIRMED (§3.3)
    params = item["params"]
    if not isinstance(params, dict):
        raise CreateRejected(f"{where}.params: Input should be a valid dictionary")
    for key in item:
        if key not in ("custom_id", "params"):
            raise CreateRejected(f"{where}.{key}: Extra inputs are not permitted")  # UNCONFIRMED
    return custom_id, params


def _check_unique(custom_ids: list[str]) -> None:
    if len(set(custom_ids)) == len(custom_ids):
        return
    seen: set[str] = set()
    for custom_id in custom_ids:
        if custom_id in seen:
            raise CreateRejected(
                "requests: custom_id's must be unique within a batch. "
                f"Duplicate custom_id found: {custom_id}"
            )
        seen.add(custom_id)


def _add_request(
    parsed: ParsedRequests,
    custom_id: str,
    params: dict[str, object],
    models: frozenset[str],
    interned: dict[str, str],
) -> None:
    model = params.get("model")
    model_name = model if isinstance(model, str) else ""
    max_tokens = params.get("max_tokens")
    error = params_error(params, models)
    if error is not None:
        parsed.errors[len(parsed.custom_ids)] = error
    parsed.custom_ids.append(custom_id)
    parsed.models.append(interned.setdefault(model_name, model_name))
    usable = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
    parsed.max_tokens.append(max_tokens if usable else 0)  # type: ignore[arg-type]
    parsed.texts.append(last_user_text(params.get("messages")))
    parsed.input_bytes.append(len(orjson.dumps(params)))


def params_error(params: dict[str, object], models: frozenset[str]) -> RequestError | None:
    """The error an `errored` line will carry for these params, or None (§3.3).

    The messages are the captured ones where known; the order of the checks and the
    messages marked below are UNCONFIRMED.
    """
    invalid = "invalid_request_error"
    model = params.get("model")
    if "model" not in params:
        return invalid, "model: Field required"  # UNCONFIRMED wording, like messages'
    if not isinstance(model, str):
        return invalid, "model: Input should be a valid string"  # UNCONFIRMED
    max_tokens = params.get("max_tokens")
    if "max_tokens" not in params:
        return invalid, "max_tokens: Field required"  # UNCONFIRMED wording
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return invalid, "max_tokens: Input should be a valid integer"  # UNCONFIRMED
    if max_tokens < 1:
        return invalid, "max_tokens: must be greater than or equal to 1"
    messages = params.get("messages")
    if "messages" not in params:
        return invalid, "messages: Field required"
    if not isinstance(messages, list):
        return invalid, "messages: Input should be a valid list"  # UNCONFIRMED
    if not messages:
        return invalid, "messages: at least one message is required"  # UNCONFIRMED
    if params.get("stream") is True:
        return invalid, '"stream=True" is not supported in the Message Batches API'
    if models and model not in models:
        return "not_found_error", f"model: {model}"
    return None


def last_user_text(messages: object) -> str:
    """The text of the last user message (string or text blocks), capped."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content[:MAX_TEXT_CHARS]
        if isinstance(content, list):
            parts = [
                block["text"]
                for block in content
                if isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
            ]
            return "\n".join(parts)[:MAX_TEXT_CHARS]
        return ""
    return ""
