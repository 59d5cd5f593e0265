"""The SQLite transcript store: connection, schema and migrations, writes, reads, recorder."""
