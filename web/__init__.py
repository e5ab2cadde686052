"""The web tier: HTTP API, WebSocket and API docs; owns the database schema."""
