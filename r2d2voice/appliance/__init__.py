"""One run: the nursery and its channels, sources and sinks, composition from settings."""
