import orjson
import pytest

from batchd.domain import Usage
from batchd.pipeline.outcomes import (
    MalformedResultLine,
    _general,
    is_retryable,
    parse_result_line,
)

# Spec §4.2, a captured line.
SUCCEEDED = (
    b'{"custom_id":"ok-1","result":{"type":"succeeded","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"claude-haiku-4-5-20251001","content":[{"type":"text",'
    b'"text":"1"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":16,'
    b'"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"cache_creation":'
    b'{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":5,'
    b'"service_tier":"batch","inference_geo":"not_available"}}}}'
)


def errored(error: dict[str, object], custom_id: str = "e-1") -> bytes:
    return orjson.dumps({"custom_id": custom_id, "result": {"type": "errored", "error": error}})


def nested(error_type: str, message: str = "boom") -> dict[str, object]:
    """§4.1: the real envelope, type at result.error.error.type."""
    return {
        "type": "error",
        "error": {
            "details": {"error_visibility": "user_facing"},
            "type": error_type,
            "message": message,
        },
        "request_id": None,
    }


def test_succeeded_line_gives_usage_model_and_result_json() -> None:
    outcome = parse_result_line(SUCCEEDED)
    assert outcome.custom_id == "ok-1"
    assert outcome.result_type == "succeeded"
    assert outcome.error is None
    assert outcome.retryable is False
    assert outcome.model == "claude-haiku-4-5-20251001"
    assert outcome.usage == Usage(16, 5, 3, 4)
    assert orjson.loads(outcome.result_json) == orjson.loads(SUCCEEDED)["result"]


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 7, "output_tokens": 2},
        {
            "input_tokens": 7,
            "output_tokens": 2,
            "cache_creation_input_tokens": None,
            "cache_read_input_tokens": None,
        },
    ],
)
def test_missing_or_null_cache_counts_are_zero(usage: dict[str, object]) -> None:
    line = orjson.dumps(
        {"custom_id": "a", "result": {"type": "succeeded", "message": {"usage": usage}}}
    )
    outcome = parse_result_line(line)
    assert outcome.usage == Usage(7, 2, 0, 0)
    assert outcome.model is None


def test_token_counts_that_are_not_whole_numbers_count_zero() -> None:
    usage = {"input_tokens": True, "output_tokens": 2.5, "cache_read_input_tokens": "3"}
    line = orjson.dumps(
        {"custom_id": "a", "result": {"type": "succeeded", "message": {"usage": usage}}}
    )
    assert parse_result_line(line).usage == Usage()


def test_succeeded_without_usage_counts_zero() -> None:
    line = b'{"custom_id":"a","result":{"type":"succeeded","message":{"model":"m"}}}'
    assert parse_result_line(line).usage == Usage()


def test_errored_reads_the_nested_error_type() -> None:
    outcome = parse_result_line(errored(nested("overloaded_error", "Overloaded")))
    assert outcome.result_type == "errored"
    assert outcome.error == "errored: overloaded_error: Overloaded"
    assert outcome.retryable is True
    assert outcome.usage is None


def test_errored_falls_back_to_the_documented_flat_form() -> None:
    """§4.1: some doc examples put the type at result.error.type."""
    outcome = parse_result_line(errored({"type": "invalid_request_error", "message": "bad"}))
    assert outcome.error == "errored: invalid_request_error: bad"
    assert outcome.retryable is False


def test_errored_without_any_error_details_is_kept_not_retryable() -> None:
    outcome = parse_result_line(b'{"custom_id":"x","result":{"type":"errored"}}')
    assert outcome.error == "errored: the result carries no error type"
    assert outcome.retryable is False


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [
        ("api_error", True),
        ("overloaded_error", True),
        ("rate_limit_error", True),
        ("timeout_error", True),
        ("invalid_request_error", False),
        ("not_found_error", False),
        ("authentication_error", False),
        ("billing_error", False),
        ("permission_error", False),
        ("request_too_large", False),
        ("brand_new_server_error", True),  # unknown *_error: transient, attempts cap it
        ("something_else", False),
    ],
)
def test_error_types_retryable(error_type: str, retryable: bool) -> None:
    assert is_retryable(error_type) is retryable
    assert parse_result_line(errored(nested(error_type))).retryable is retryable


def test_expired_and_canceled_are_retryable_with_readable_reasons() -> None:
    expired = parse_result_line(b'{"custom_id":"x","result":{"type":"expired"}}')
    assert expired.result_type == "expired"
    assert expired.retryable is True
    assert expired.error == (
        "expired: the batch reached its 24 hour expiry before this request was processed"
    )
    canceled = parse_result_line(b'{"custom_id":"c-1","result":{"type":"canceled"}}')
    assert canceled.result_type == "canceled"
    assert canceled.retryable is True
    assert canceled.error == "canceled: the batch was canceled before this request was processed"
    assert canceled.result_json == '{"type":"canceled"}'


def test_unknown_keys_are_tolerated() -> None:
    line = b'{"custom_id":"x","extra":1,"result":{"type":"expired","new_field":[1,2]}}'
    assert orjson.loads(parse_result_line(line).result_json) == {
        "type": "expired",
        "new_field": [1, 2],
    }


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"result":{"type":"expired"}}', "no custom_id"),
        (b'{"custom_id":"","result":{"type":"expired"}}', "no custom_id"),
        (b'{"custom_id":"x"}', "no result object"),
        (b'{"custom_id":"x","result":{"type":"mystery"}}', "unknown result.type 'mystery'"),
        (b'{"custom_id":"x","result":{"type":["expired"]}}', r"unknown result.type \['expired'\]"),
        (b'{"custom_id":"x","result":{"type":"succeeded"}}', "succeeded without a message"),
    ],
)
def test_malformed_lines_raise_with_the_reason(line: bytes, reason: str) -> None:
    with pytest.raises(MalformedResultLine, match=reason):
        parse_result_line(line)


def _same_outcome(line: bytes) -> None:
    """The typed path's answer equals the general path's (the result's text aside)."""
    try:
        expected = _general(line)
    except MalformedResultLine as exc:
        reason = str(exc)
    else:
        reason = None
    if reason is not None:
        with pytest.raises(MalformedResultLine) as raised:
            parse_result_line(line)
        assert str(raised.value) == reason
        return
    outcome = parse_result_line(line)
    assert orjson.loads(outcome.result_json) == orjson.loads(expected.result_json)
    assert (outcome.custom_id, outcome.result_type, outcome.error, outcome.retryable) == (
        expected.custom_id,
        expected.result_type,
        expected.error,
        expected.retryable,
    )
    assert (outcome.usage, outcome.model) == (expected.usage, expected.model)


def _succeeded_with(usage: str, model: str = '"m"') -> bytes:
    return b'{"custom_id":"a","result":{"type":"succeeded","message":{"model":%s,"usage":%s}}}' % (
        model.encode(),
        usage.encode(),
    )


@pytest.mark.parametrize(
    "line",
    [
        SUCCEEDED,
        _succeeded_with('{"input_tokens":7,"output_tokens":null}'),
        _succeeded_with('{"input_tokens":9223372036854775807,"output_tokens":1}'),
        _succeeded_with('{"input_tokens":9223372036854775808,"output_tokens":1}'),
        _succeeded_with('{"input_tokens":18446744073709551616,"output_tokens":1}'),
        _succeeded_with('{"input_tokens":-1,"output_tokens":1e2}'),
        _succeeded_with('{"input_tokens":false,"output_tokens":"2"}'),
        _succeeded_with("null"),
        _succeeded_with("[1]"),
        _succeeded_with('{"input_tokens":1}', model="null"),
        _succeeded_with('{"input_tokens":1}', model="5"),
        b'{"custom_id":"a","result":{"type":"succeeded","message":null}}',
        b'{"custom_id":"a","result":{"type":"succeeded","message":"text"}}',
        b'{"custom_id":"a","result":{"type":"expired","message":"ignored"}}',
        b'{"custom_id":"a","result":{"type":"canceled","type":"expired"}}',
        b'{"custom_id":"a","custom_id":"b","result":{"type":"expired"}}',
        b'{"custom_id":"a","result":{"type":"expired"},"result":{"type":"canceled"}}',
        b'{"custom_id":null,"result":{"type":"expired"}}',
        b'{"custom_id":5,"result":{"type":"expired"}}',
        b'{"custom_id":"a","result":null}',
        b'{"custom_id":"a","result":{"type":null}}',
        b'{"custom_id":"a","result":{"type":"expired","n":[' + b"[" * 1100 + b"]" * 1100 + b"]}}",
        b'{"custom_id":"a","result":{"type":"expired","t":"\xff"}}',
        b'{"custom_id":"a","result":{"type":"expired","t":"\\ud800"}}',
        b'{"custom_id":"a","result":{"type":"expired"}} trailing',
        errored(nested("overloaded_error")),
    ],
)
def test_every_line_shape_gets_the_general_answer(line: bytes) -> None:
    _same_outcome(line)


def test_the_result_is_kept_as_the_api_sent_it() -> None:
    """Never re-serialised: the stored text is the line's own `result` text."""
    line = b'{"custom_id": "x", "result": {"type": "expired", "note": "caf\\u00e9"}}'
    assert parse_result_line(line).result_json == '{"type": "expired", "note": "caf\\u00e9"}'
