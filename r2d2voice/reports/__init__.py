"""Reading the record back: export, sessions, usage, stats and the memory."""
