"""What the processes say to each other: statuses, names, payloads, events.

Shared by `web`, `jobs` and `gpu_node`; imports only pydantic and the standard
library, never a process package, torch or a database driver.
"""
