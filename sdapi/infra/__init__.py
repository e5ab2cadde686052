"""Plumbing every process shares in production: settings, Redis, Consul, the queue.

Imports no process package (`web`, `jobs`, `gpu_node`), no database code and no
development tool.
"""
