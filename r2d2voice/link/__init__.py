"""The trio shell around one Realtime websocket: transport, connection, effects, supervisor."""
