"""The SQLite store: connection, schema and migrations, writes, reads, recorder, memory."""
