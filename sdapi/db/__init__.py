"""The database both `web` and `jobs` use: models, migrations, the mail outbox.

Imports Tortoise, Redis and the plumbing below it, never a process package, so
`jobs` reaches the tables without importing the aiohttp app.
"""
