"""Rules a job file must pass, from Nomad's job specification and our own;
each returns the problems it finds (an empty list: the job passes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tests.nomad.jobspec import (
    env_lines,
    items,
    labelled,
    resolve,
    seconds,
    services,
    tasks,
    template_data,
)

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIAL", re.IGNORECASE)


def device_errors(job: Mapping[str, Any]) -> list[str]:
    """Device requests (GPUs) only in tasks of the docker driver."""
    errors = []
    for _, name, task in tasks(job):
        devices = [d for r in items(task, "resources") for d in labelled(r, "device")]
        if devices and task.get("driver") != "docker":
            errors.append(f"task {name}: a device with driver {task.get('driver')}")
    return errors


def update_errors(job: Mapping[str, Any]) -> list[str]:
    """Updates revert, and leave each stage more time than the one before."""
    blocks = items(job, "update") + [
        u for _, group in labelled(job, "group") for u in items(group, "update")
    ]
    if not blocks:
        return ["no update block"]
    errors = []
    for update in blocks:
        if update.get("auto_revert") is not True:
            errors.append("update without auto_revert")
        if update.get("canary", 0) == 0 and "max_parallel" not in update:
            errors.append("update neither canary nor rolling")
        progress = seconds(update.get("progress_deadline", "10m"))
        healthy = seconds(update.get("healthy_deadline", "5m"))
        if progress <= healthy:
            errors.append("progress_deadline must exceed healthy_deadline")
        if healthy <= seconds(update.get("min_healthy_time", "10s")):
            errors.append("healthy_deadline must exceed min_healthy_time")
        if update.get("canary", 0) > 0 and update.get("health_check") != "checks":
            errors.append("a canary is judged by its checks")
    return errors


def policy_errors(job: Mapping[str, Any]) -> list[str]:
    """Every group restarts, and is rescheduled unless the job is a system job."""
    errors = []
    for name, group in labelled(job, "group"):
        if not items(group, "restart"):
            errors.append(f"group {name}: no restart block")
        # A system job runs on every eligible machine; it is never rescheduled.
        if job.get("type") != "system" and not items(group, "reschedule"):
            errors.append(f"group {name}: no reschedule block")
    return errors


def check_errors(job: Mapping[str, Any]) -> list[str]:
    """Every service has checks, each with an interval and a shorter timeout."""
    errors = []
    for service in services(job):
        checks = items(service, "check")
        if not checks:
            errors.append(f"service {service.get('name')}: no check")
        for check in checks:
            where = f"service {service.get('name')} check {check.get('name')}"
            if "interval" not in check or "timeout" not in check:
                errors.append(f"{where}: interval and timeout are required")
            elif not 0 < seconds(check["timeout"]) < seconds(check["interval"]):
                errors.append(f"{where}: the timeout must be shorter than the interval")
    return errors


def scaling_errors(job: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """With the variables' values: 0 <= min <= count <= max."""
    errors = []
    for name, group in labelled(job, "group"):
        count = resolve(group.get("count", 1), values)
        for scaling in items(group, "scaling"):
            low = resolve(scaling["min"], values)
            high = resolve(scaling["max"], values)
            if not 0 <= low <= count <= high:
                errors.append(
                    f"group {name}: not min {low} <= count {count} <= max {high}"
                )
    return errors


def literal_secrets(task: Mapping[str, Any]) -> list[str]:
    """Secret-looking settings whose value is not rendered from a Nomad Variable."""
    found = []
    for env in items(task, "env"):
        found += [name for name in env if SECRET_NAME.search(name)]
    for template in items(task, "template"):
        text = template_data(template)
        for name, value in env_lines(text).items():
            if SECRET_NAME.search(name) and not re.fullmatch(r"\{\{.*\}\}", value):
                found.append(name)
            # user:password@ in a URL: the password must be a template value.
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                if not password.startswith("{{"):
                    found.append(name)
        uses_values = re.search(r"\{\{\s*\.\w+", text)
        if uses_values and "nomadVar" not in text:
            found.append("a template reads values from somewhere else than nomadVar")
    return found
