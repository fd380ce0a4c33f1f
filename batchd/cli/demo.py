"""`batchd demo`: the whole pipeline on a throwaway database against the bundled fake API."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import orjson

from batchd.cli.commands import render_status, status_snapshot
from batchd.config import Config, DatabaseConfig
from batchd.domain import TaskStatus
from batchd.fakeapi.server import FakeApiConfig, FakeApiServer
from batchd.service.daemon import run_daemon
from batchd.store import open_store

PRODUCTS = (
    "Wireless Bluetooth Headphones with 40-hour battery life and active noise cancellation",
    "Ergonomic Office Chair with lumbar support and breathable mesh back",
    "Smart Water Bottle that tracks hydration and syncs with fitness apps",
    "Cast Iron Skillet, pre-seasoned, 12 inch, oven safe to 500F",
    "Mechanical Keyboard with hot-swappable switches and per-key RGB lighting",
    "Standing Desk with dual motors and four memory presets",
    "Robot Vacuum with lidar mapping and a self-emptying base",
    "Merino Wool Hiking Socks, cushioned, odour resistant",
    "Portable Espresso Maker that works without electricity",
    "Noise-Masking Sleep Earbuds with a 10-hour battery",
    "Solar Power Bank, 20,000 mAh, with two USB-C ports",
    "Insulated Lunch Box with three leak-proof compartments",
)
MODEL = "claude-haiku-4-5-20251001"


def demo_requests(count: int) -> list[tuple[str, str]]:
    """Product-description prompts like the guide's, plus one row the API would refuse."""
    rows = []
    for index in range(count):
        product = PRODUCTS[index % len(PRODUCTS)]
        params = {
            "model": MODEL,
            "max_tokens": 300,
            "messages": [
                {
                    "role": "user",
                    "content": f"Write a compelling product description for: {product} "
                    f"(variant {index + 1}). Max 100 words.",
                }
            ],
        }
        rows.append((f"product-{index + 1:03d}", orjson.dumps(params).decode()))
    # One bad row, to show that it is marked invalid with a reason and nothing else stops.
    rows.append(("product-bad", orjson.dumps({"model": MODEL, "messages": []}).decode()))
    return rows


async def run_demo(task_count: int = 36, processing_seconds: float = 2.0) -> int:
    with tempfile.TemporaryDirectory(prefix="batchd-demo-") as workdir:
        database = Path(workdir) / "demo.db"
        print(f"batchd demo: database {database}")
        fake_config = FakeApiConfig(port=0, processing_seconds=processing_seconds, seed=7)
        async with FakeApiServer(fake_config) as server:
            print(f"fake Message Batches API at {server.base_url}")
            store = await open_store(DatabaseConfig(path=database))
            try:
                report = await store.enqueue(demo_requests(task_count))
            finally:
                await store.close()
            print(f"enqueued {report.inserted} tasks; running the daemon until all are done\n")
            config = _demo_config(database, server.base_url)
            code = await run_daemon(config, "demo-key", exit_when_idle=True)
        return await _summarise(database, code)


def _demo_config(database: Path, base_url: str) -> Config:
    config = Config()
    return replace(
        config,
        database=replace(config.database, path=database),
        api=replace(config.api, base_url=base_url),
        # Small batches and quick polls, so a few batches are seen moving in seconds.
        batching=replace(config.batching, max_requests=10, linger_s=0.2),
        polling=replace(config.polling, interval_s=0.5),
    )


async def _summarise(database: Path, exit_code: int) -> int:
    store = await open_store(DatabaseConfig(path=database))
    try:
        print("\n" + render_status(await status_snapshot(store)))
        rows = await store.tasks_by_custom_id(["product-001", "product-002", "product-bad"])
        print("\nsample results:")
        for row in rows:
            if row.status == TaskStatus.SUCCEEDED and row.result_json:
                text = orjson.loads(row.result_json)["message"]["content"][0]["text"]
                print(f"  {row.custom_id}: {text[:110]}...")
            else:
                print(f"  {row.custom_id}: {row.status}: {row.error}")
        counts = await store.status_counts()
    finally:
        await store.close()
    done = counts[TaskStatus.SUCCEEDED]
    print(
        f"\n{done} succeeded. In real use: `batchd run` as a service, feed it with INSERTs or "
        "`batchd enqueue`, query with `batchd status`."
    )
    return exit_code
