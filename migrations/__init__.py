"""Numbered SQL migrations, applied in order by batchd.store."""
