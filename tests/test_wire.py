from datetime import UTC, datetime

from batchd.api.wire import CUSTOM_ID_PATTERN, format_timestamp, parse_timestamp, request_total


def test_timestamps_use_the_real_servers_form_and_parse_both_forms() -> None:
    moment = datetime(2025, 1, 29, 14, 25, 40, 141141, tzinfo=UTC)
    assert format_timestamp(moment) == "2025-01-29T14:25:40.141141+00:00"
    assert parse_timestamp("2024-09-24T18:37:24.100435Z") == datetime(
        2024, 9, 24, 18, 37, 24, 100435, tzinfo=UTC
    )
    assert parse_timestamp(format_timestamp(moment)) == moment


def test_custom_id_pattern_matches_the_api_rule() -> None:
    assert CUSTOM_ID_PATTERN.match("a" * 64)
    assert not CUSTOM_ID_PATTERN.match("a" * 65)
    assert not CUSTOM_ID_PATTERN.match("has space")
    assert not CUSTOM_ID_PATTERN.match("")
    assert not CUSTOM_ID_PATTERN.fullmatch("trailing-newline\n")


def test_request_total_sums_every_count() -> None:
    counts = {"processing": 1, "succeeded": 2, "errored": 3, "canceled": 4, "expired": 5}
    assert request_total(counts) == 15  # type: ignore[arg-type]
