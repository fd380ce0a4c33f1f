"""Configuration: TOML file plus environment, into one frozen, validated `Config`.

Every key is documented in config.example.toml. A bad value fails at start with a
message that names the key; unknown keys are errors too (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from batchd.api.wire import DEFAULT_BASE_URL, MAX_BATCH_BYTES, MAX_REQUESTS_PER_BATCH
from batchd.money.pricing import ModelPrice

CREDENTIAL_NAME = "anthropic-api-key"
# The shortest wait before a create whose outcome is unknown is given up as never made and
# its requests sent again (pipeline/reconcile.py, design step 4). The API's reads can lag a
# create: a batch was seen answering 404 a full second after its create was answered (spec
# §7.6, ISS #1432). At 0 the daemon gives up after a single list call; 5 s is a
# several-fold margin over that lag, with the submitter listing again every 2 s meanwhile.
# The default (60 s) follows the spec's advice to wait out such glitches for a few tens of
# seconds. (Tests against the fake API, whose list never lags, may set the field lower.)
MIN_RECONCILE_GRACE_S = 5.0
# The shortest run of 404s on retrieve after which a batch is declared lost and its requests
# sent again (pipeline/poller.py). The run is counted from the later of the create and the
# first 404, so it must outlast the API's 404s on a batch it has just created: one was seen a
# full second after its create (spec §7.6, ISS #1432). Below that, one such glitch seen twice
# (at a short poll interval) pays for every request of the batch twice. The default (60 s)
# follows the spec's advice of a few tens of seconds; test rigs use this floor.
MIN_NOT_FOUND_GRACE_S = 1.0


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


DATABASE_URL_ENV = "BATCHD_DATABASE_URL"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    path: Path = Path("batchd.db")
    busy_timeout_ms: int = 5000
    # A postgresql:// URL selects the PostgreSQL store (path is then unused); may hold a
    # password, so it is only ever shown through batchd.store.dsn.mask_dsn.
    url: str | None = None
    # PostgreSQL only: the schema batchd's tables live in (its search_path); None: public.
    schema: str | None = None


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "ANTHROPIC_API_KEY"
    api_key_file: Path | None = None
    request_timeout_s: float = 60.0
    max_retries: int = 5


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_requests: int = 10_000
    max_bytes: int = MAX_BATCH_BYTES
    max_in_flight_requests: int = 100_000
    linger_s: float = 5.0
    max_attempts: int = 3
    reconcile_grace_s: float = 60.0
    # After an intent is released for want of a batch on the list, the list is still
    # searched this long for one that lands late (a lagging list, a late commit).
    duplicate_watch_s: float = 600.0


@dataclass(frozen=True, slots=True)
class PollingConfig:
    interval_s: float = 30.0
    max_concurrency: int = 8
    not_found_grace_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ResultsConfig:
    chunk_size: int = 5000
    max_line_bytes: int = 256 * 1024 * 1024
    max_download_attempts: int = 10
    # PostgreSQL, several daemons: how long a daemon holds an ended batch it collects
    # without renewing (it renews every third of it); a daemon that died is replaced
    # after at most this long. SQLite admits one daemon: unused there.
    lease_s: float = 60.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "auto"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """`[pricing.MODEL]` tables: list prices (USD per million tokens) over the defaults."""

    models: Mapping[str, ModelPrice] = field(default_factory=dict)


BUDGET_PERIODS = ("day", "month", "total")


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Submission pauses once spending in the period (UTC) would pass max_spend_usd."""

    max_spend_usd: float | None = None  # None: no budget
    period: str = "month"


@dataclass(frozen=True, slots=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    polling: PollingConfig = field(default_factory=PollingConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


# Every component is handed its own section (`config.batching` to the submitter and the
# reconciler, `config.polling` to the poller). The two that read keys of several sections
# get one settings object each, built here from the whole Config and nowhere else, so a
# key moving between sections changes one line, not the daemon and every test rig.


@dataclass(frozen=True, slots=True)
class CollectorSettings:
    """The collector's: [results], and [batching] max_attempts, the attempts after which
    a result that asks for a retry fails its task instead of requeueing it."""

    results: ResultsConfig
    max_attempts: int

    @classmethod
    def of(cls, config: Config) -> CollectorSettings:
        return cls(config.results, config.batching.max_attempts)


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    """The budget gate's: the limit ([budget]), the prices spending is weighed in
    ([pricing]) and the largest next batch it weighs ([batching] max_requests)."""

    budget: BudgetConfig
    pricing: PricingConfig
    next_batch_requests: int

    @classmethod
    def of(cls, config: Config) -> BudgetSettings | None:
        """None when no budget is configured: no gate, nothing read, nothing checked."""
        if config.budget.max_spend_usd is None:
            return None
        return cls(config.budget, config.pricing, config.batching.max_requests)


# TOML key -> dataclass field, where the documented key (config.example.toml) says the unit
# in words and the field abbreviates it. Only the documented key is read: the field's name
# in a file is an error naming the key, so one setting cannot be given twice.
_KEY_ALIASES = {
    "request_timeout_seconds": "request_timeout_s",
    "linger_seconds": "linger_s",
    "reconcile_grace_seconds": "reconcile_grace_s",
    "duplicate_watch_seconds": "duplicate_watch_s",
    "interval_seconds": "interval_s",
    "not_found_grace_seconds": "not_found_grace_s",
    "lease_seconds": "lease_s",
}
_FIELD_KEYS = {field_name: key for key, field_name in _KEY_ALIASES.items()}
_SECTIONS: dict[str, type[Any]] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def documented_keys() -> dict[str, dict[str, str]]:
    """Section -> each key it takes -> the field that key sets. For [pricing], the keys of
    each `[pricing.MODEL]` table (fields of ModelPrice)."""
    keys = {
        name: {_FIELD_KEYS.get(f.name, f.name): f.name for f in fields(cls)}
        for name, cls in _SECTIONS.items()
    }
    keys["pricing"] = {key: key for key in _PRICE_KEYS}
    return keys


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any) and the environment into a validated Config."""
    env = os.environ if env is None else env
    if path is None and env.get("BATCHD_CONFIG"):
        path = Path(env["BATCHD_CONFIG"])
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base_url_in_file = isinstance(raw.get("api"), dict) and "base_url" in raw["api"]
    path_in_file = isinstance(raw.get("database"), dict) and "path" in raw["database"]
    sections = {name: _build_section(name, raw.pop(name, {})) for name in _SECTIONS}
    if raw:
        raise ConfigError(f"unknown config section or key: {', '.join(sorted(raw))}")
    config = Config(**sections)
    if env.get("ANTHROPIC_BASE_URL") and not base_url_in_file:
        # As the official SDK does; an explicit key in the file wins.
        config = replace(config, api=replace(config.api, base_url=env["ANTHROPIC_BASE_URL"]))
    config = _database_from_env(config, env, path_in_file=path_in_file)
    _validate(config)
    return config


def _build_section(name: str, values: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table")
    if name == "pricing":
        return PricingConfig({model: _build_price(model, price) for model, price in values.items()})
    if name == "budget":
        return _build_budget(values)
    if name == "api" and "api_key" in values:
        raise ConfigError(
            "[api] api_key: the key is never read from the config file; set "
            "ANTHROPIC_API_KEY (or [api] api_key_env) or [api] api_key_file"
        )
    if name == "database" and "path" in values and "url" in values:
        raise ConfigError(
            "[database] path and [database] url: give one, path for SQLite or url for PostgreSQL"
        )
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        field_name = _field_of(name, key, values, known)
        if (name, field_name) in _OPTIONAL_TEXT:
            kwargs[field_name] = _text(f"[{name}] {key}", value)
            continue
        default = getattr(cls(), field_name)
        kwargs[field_name] = _coerce(f"[{name}] {key}", value, default)
    return cls(**kwargs)


def _field_of(section: str, key: str, values: dict[str, Any], known: set[str]) -> str:
    """The field a documented key sets; any other key is an error naming it."""
    field_name = _KEY_ALIASES.get(key, key)
    if field_name in known and key not in _FIELD_KEYS:
        return field_name
    if key in known:  # the field's own name, where the documented key says the unit
        documented = _FIELD_KEYS[key]
        if documented in values:
            raise ConfigError(
                f"[{section}] {documented} and [{section}] {key}: the same setting twice; "
                f"give {documented} only"
            )
        raise ConfigError(f"[{section}] {key}: unknown key (the key is {documented})")
    raise ConfigError(f"[{section}] {key}: unknown key")


# Keys whose default is None but whose value is text, not a path.
_OPTIONAL_TEXT = {("database", "url"), ("database", "schema")}


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {type(value).__name__}")
    return value


def _database_from_env(config: Config, env: Mapping[str, str], *, path_in_file: bool) -> Config:
    """BATCHD_DATABASE_URL overrides [database] url; beside a path in the file it is an
    error rather than a silent switch of store (tasks would go to another database)."""
    url = env.get(DATABASE_URL_ENV)
    if not url:
        return config
    if path_in_file:
        raise ConfigError(
            f"[database] path is set in the config file and {DATABASE_URL_ENV} in the "
            "environment: give one, path for SQLite or the URL for PostgreSQL"
        )
    return replace(config, database=replace(config.database, url=url))


_PRICE_KEYS = ("input", "output", "cache_write", "cache_read")


def _build_price(model: str, values: Any) -> ModelPrice:
    """input and output are required; cache prices default to 1.25x / 0.1x of input."""
    where = f'[pricing."{model}"]'
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table with input and output prices")
    for key in values:
        if key not in _PRICE_KEYS:
            raise ConfigError(f"{where} {key}: unknown key (expected {', '.join(_PRICE_KEYS)})")
    for key in ("input", "output"):
        if key not in values:
            raise ConfigError(f"{where} {key}: required (USD per million tokens)")
    usd = {key: _usd(f"{where} {key}", value) for key, value in values.items()}
    derived = ModelPrice.of(usd["input"], usd["output"])
    return replace(derived, **{k: v for k, v in usd.items() if k.startswith("cache_")})


def _build_budget(values: dict[str, Any]) -> BudgetConfig:
    for key in values:
        if key not in {"max_spend_usd", "period"}:
            raise ConfigError(f"[budget] {key}: unknown key")
    limit = values.get("max_spend_usd")
    if limit is not None:
        limit = _usd("[budget] max_spend_usd", limit)
        _check(limit > 0, "[budget] max_spend_usd: must be > 0")
    period = values.get("period", BudgetConfig().period)
    _check(
        period in BUDGET_PERIODS,
        f"[budget] period: must be {', '.join(BUDGET_PERIODS)}, got {period!r}",
    )
    return BudgetConfig(limit, period)


def _usd(key: str, value: Any) -> float:
    usd = float(_coerce(key, value, 0.0))
    _check(usd >= 0, f"{key}: must be >= 0, got {value!r}")
    return usd


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, Path) or default is None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _validate_database(database: DatabaseConfig) -> None:
    # Imported here: the store package may import this module (a store opened from a
    # DatabaseConfig), and importing it from the top would make that a cycle.
    from batchd.store.dsn import DsnError, check_dsn  # noqa: PLC0415

    if database.url is not None:
        try:
            check_dsn(database.url)
        except DsnError as exc:  # the message shows the URL masked
            raise ConfigError(f"[database] url: {exc}") from None
    if database.schema is not None:
        _check(
            database.url is not None,
            f"[database] schema: only for PostgreSQL (set [database] url or {DATABASE_URL_ENV})",
        )
        # PostgreSQL truncates identifiers to 63 bytes: two long names could meet.
        _check(
            len(database.schema.encode()) <= 63 and "\x00" not in database.schema,
            "[database] schema: must be at most 63 bytes, without NUL",
        )


def _validate(config: Config) -> None:
    _validate_database(config.database)
    b = config.batching
    _check(
        1 <= b.max_requests <= MAX_REQUESTS_PER_BATCH,
        f"[batching] max_requests: must be 1..{MAX_REQUESTS_PER_BATCH}, got {b.max_requests}",
    )
    _check(
        1024 <= b.max_bytes <= MAX_BATCH_BYTES,
        f"[batching] max_bytes: must be 1024..{MAX_BATCH_BYTES}, got {b.max_bytes}",
    )
    _check(b.max_in_flight_requests >= 1, "[batching] max_in_flight_requests: must be >= 1")
    _check(b.linger_s >= 0, "[batching] linger_seconds: must be >= 0")
    _check(b.max_attempts >= 1, "[batching] max_attempts: must be >= 1")
    _check(
        b.reconcile_grace_s >= MIN_RECONCILE_GRACE_S,
        f"[batching] reconcile_grace_seconds: must be >= {MIN_RECONCILE_GRACE_S:g} (a create "
        "whose answer was lost is sent again once its batch has not shown on the list "
        "endpoint for this long; the list can lag a create, and sending too soon pays twice), "
        f"got {b.reconcile_grace_s:g}",
    )
    _check(b.duplicate_watch_s >= 0, "[batching] duplicate_watch_seconds: must be >= 0")
    p = config.polling
    _check(p.interval_s > 0, "[polling] interval_seconds: must be > 0")
    _check(p.max_concurrency >= 1, "[polling] max_concurrency: must be >= 1")
    _check(
        p.not_found_grace_s >= MIN_NOT_FOUND_GRACE_S,
        f"[polling] not_found_grace_seconds: must be >= {MIN_NOT_FOUND_GRACE_S:g} (the API "
        "can answer 404 for a batch a second after creating it, spec §7.6; a batch declared "
        "lost sooner has its requests sent, and paid for, again), "
        f"got {p.not_found_grace_s:g}",
    )
    _check(config.results.chunk_size >= 1, "[results] chunk_size: must be >= 1")
    _check(config.results.max_line_bytes >= 1024, "[results] max_line_bytes: must be >= 1024")
    _check(config.results.lease_s >= 1, "[results] lease_seconds: must be >= 1")
    _check(config.api.request_timeout_s > 0, "[api] request_timeout_seconds: must be > 0")
    _check(config.api.max_retries >= 0, "[api] max_retries: must be >= 0")
    _check(
        config.api.base_url.startswith(("http://", "https://")),
        f"[api] base_url: must start with http:// or https://, got {config.api.base_url!r}",
    )
    _check(
        config.logging.format in {"auto", "json", "console"},
        "[logging] format: must be auto, json or console",
    )
    _check(
        config.logging.level in {"debug", "info", "warning", "error"},
        "[logging] level: must be debug, info, warning or error",
    )
    _check(0 <= config.metrics.port <= 65535, "[metrics] port: must be 0..65535")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_api_key(config: Config, env: Mapping[str, str] | None = None) -> str | None:
    """The API key from the environment, a file, or systemd's credentials; never logged.

    Raises ConfigError for a key that could not be sent in a header (a pasted curly quote,
    a space): better said at start than as an encoding error at the first call.
    """
    env = os.environ if env is None else env
    if config.api.api_key_file is not None:
        key = _read_key_file(config.api.api_key_file, "[api] api_key_file")
    elif env.get(config.api.api_key_env):
        key = env[config.api.api_key_env].strip()
    elif (credentials := env.get("CREDENTIALS_DIRECTORY")) and (
        Path(credentials) / CREDENTIAL_NAME
    ).is_file():
        key = _read_key_file(Path(credentials) / CREDENTIAL_NAME, "systemd credential")
    else:
        return None
    for position, char in enumerate(key):
        if not (char.isascii() and char.isprintable() and not char.isspace()):
            # The position and the code point only: never the key or a piece of it.
            raise ConfigError(
                f"the API key holds a character that cannot be sent in a header "
                f"(U+{ord(char):04X} at position {position + 1}): check for a pasted quote "
                "or space"
            )
    return key


def _read_key_file(path: Path, what: str) -> str:
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if not key:
        raise ConfigError(f"{what}: {path} is empty")
    return key


def api_key_source(config: Config, env: Mapping[str, str] | None = None) -> str | None:
    """Where `resolve_api_key` takes the key from, for messages: never the key itself."""
    env = os.environ if env is None else env
    if config.api.api_key_file is not None:
        return f"[api] api_key_file {config.api.api_key_file}"
    if env.get(config.api.api_key_env):
        return f"${config.api.api_key_env}"
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        return f"systemd credential {CREDENTIAL_NAME} ({Path(credentials) / CREDENTIAL_NAME})"
    return None
