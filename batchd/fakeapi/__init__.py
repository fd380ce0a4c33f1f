"""A faithful local emulator of the Message Batches API (`batchd fake-api`).

- `server`: `FakeApiConfig`, `FakeApiServer` (in-process, `async with`), the CLI options
- `app`: the six endpoints under /v1/messages/batches, errors and headers as captured
- `admin`: test-only control endpoints under /_fake/ (stats, faults, down, advance)
- `state`: the clock-driven state machine; `validation`: create-body checks
- `results`: JSONL rendering in chunks; `faults`: fault injection; `persistence`: --state
"""
