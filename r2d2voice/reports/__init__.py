"""Reading the record back: export, sessions, usage and stats."""
