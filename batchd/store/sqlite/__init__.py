"""The SQLite store: one file, WAL, a writer connection, a reader, and two write-back lanes."""
