"""The Realtime-compatible local stand-in: a peer that imports only audio and realtime."""
