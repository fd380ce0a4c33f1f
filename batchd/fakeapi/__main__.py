"""`python -m batchd.fakeapi`: the same server as `batchd fake-api`."""

from __future__ import annotations

import argparse
import asyncio

from batchd.fakeapi.server import add_arguments, serve


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchd.fakeapi", description="Serve the Message Batches API emulator."
    )
    add_arguments(parser)
    return asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
