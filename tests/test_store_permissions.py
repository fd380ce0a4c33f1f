import os
import stat
from pathlib import Path

from batchd.store.sqlite import SqliteStore


async def test_a_new_database_is_group_writable_under_the_services_umask(tmp_path: Path) -> None:
    """Other users feed the daemon through a shared group: 0660, never SQLite's 0644."""
    path = tmp_path / "shared.db"
    previous = os.umask(0o007)  # the unit's UMask=
    try:
        store = await SqliteStore.open(path)
        await store.close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660


async def test_an_existing_databases_mode_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "mine.db"
    path.touch(mode=0o600)
    path.chmod(0o600)
    store = await SqliteStore.open(path)
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
