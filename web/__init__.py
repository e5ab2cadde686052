"""The web tier: HTTP API, WebSocket, docs and playground; owns the schema."""
