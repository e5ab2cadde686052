"""Plumbing every process shares: settings, embedded servers, Redis, Consul.

Imports no process package (`web`, `jobs`, `gpu_node`) and no CLI code.
"""
