"""Helpers shared by the test modules: no tests here, and no test module imports another.

Fixtures live in the `conftest.py` files (and in `cli`, loaded as a pytest plugin by
tests/conftest.py); what a test calls or builds lives here: `store` (a fixed clock, tasks,
batches, outcomes), `collector` (a results server, result lines), `client`, `fakeapi`,
`params`, `cli` (batchd as a user runs it), `crash_harness` (killed and restarted runs),
`tools` (a system program a test needs: fail under CI, skip elsewhere) and `browser`
(Debian's Chromium, headless, over CDP).
"""
