"""MCP servers as tools: their config, stdio and HTTP clients, remote MCP via the service."""
