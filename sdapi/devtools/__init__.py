"""Development-only plumbing: embedded servers, the mail sink, dev's watchdogs.

`sdapi dev`, the operator commands and the tests use it; a production process
never imports it, and its wheels come with the `dev` extra only.
"""
