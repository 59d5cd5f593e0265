"""The GA OpenAI Realtime protocol, sans-IO: events both ways and turn state (stdlib only)."""
