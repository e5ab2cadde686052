"""Nomad job files read with python-hcl2 and checked against Nomad's job
specification (the blocks and attributes sdapi's files may use).

python-hcl2 parses HCL only; Nomad's own schema checks (`nomad job validate`)
need a Nomad binary, which the development machines cannot install. These
rules are written from the job specification pages
(developer.hashicorp.com/nomad/docs/job-specification) for the parts of it
that matter here: an attribute or block not listed at its level is an error,
as it is for Nomad.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions

NOMAD_DIR = Path(__file__).resolve().parents[2] / "nomad"
OPTIONS = SerializationOptions(
    strip_string_quotes=True,
    explicit_blocks=False,
    with_comments=False,
    preserve_heredocs=False,
)


@dataclass(frozen=True)
class Block:
    """What a block may hold: attributes, and child blocks by type."""

    attributes: frozenset[str] = frozenset()
    blocks: Mapping[str, Block] = field(default_factory=dict)
    # Blocks written with a label (`group "web" { ... }`).
    labelled: frozenset[str] = frozenset()
    # Any attribute name (env, meta, a strategy's options).
    free: bool = False


def _block(
    attributes: str = "",
    blocks: Mapping[str, Block] | None = None,
    labelled: str = "",
    free: bool = False,
) -> Block:
    return Block(
        frozenset(attributes.split()),
        dict(blocks or {}),
        frozenset(labelled.split()),
        free,
    )


FREE = _block(free=True)
CONSTRAINT = _block("attribute operator value")
AFFINITY = _block("attribute operator value weight")
SPREAD = _block("attribute weight", {"target": _block("value percent")}, "target")
CHECK_RESTART = _block("limit grace ignore_warnings")
CHECK = _block(
    "name type path port interval timeout method protocol command args "
    "address_mode initial_status success_before_passing failures_before_critical "
    "failures_before_warning expose grpc_service grpc_use_tls tls_skip_verify "
    "tls_server_name on_update task notes body",
    {"check_restart": CHECK_RESTART, "header": FREE},
)
SERVICE = _block(
    "name port tags canary_tags provider address address_mode task "
    "enable_tag_override on_update cluster",
    {"check": CHECK, "meta": FREE, "canary_meta": FREE, "tagged_addresses": FREE},
)
UPDATE = _block(
    "max_parallel health_check min_healthy_time healthy_deadline "
    "progress_deadline auto_revert auto_promote canary stagger"
)
RESTART = _block("attempts delay interval mode render_templates")
RESCHEDULE = _block("attempts interval delay delay_function max_delay unlimited")
NETWORK = _block(
    "mode hostname",
    {
        "port": _block("static to host_network"),
        "dns": _block("servers searches options"),
    },
    "port",
)
VOLUME = _block(
    "type source read_only access_mode attachment_mode per_alloc sticky",
    {"mount_options": _block("fs_type mount_flags")},
)
VOLUME_MOUNT = _block("volume destination read_only propagation_mode selinux_label")
TEMPLATE = _block(
    "data destination change_mode change_signal env perms uid gid "
    "left_delimiter right_delimiter source splay vault_grace error_on_missing_key "
    "once",
    {
        "wait": _block("min max"),
        "change_script": _block("command args timeout fail_on_error"),
    },
)
DEVICE = _block("count", {"constraint": CONSTRAINT, "affinity": AFFINITY})
RESOURCES = _block(
    "cpu cores memory memory_max secrets",
    {"device": DEVICE, "numa": _block("affinity devices")},
    "device",
)
LIFECYCLE = _block("hook sidecar")
# The docker driver's `config` (developer.hashicorp.com/nomad/docs/drivers/docker).
DOCKER_CONFIG = _block(
    "image args command entrypoint network_mode ports volumes labels cap_add "
    "cap_drop privileged runtime hostname work_dir shm_size force_pull "
    "image_pull_timeout init interactive readonly_rootfs security_opt "
    "ipc_mode pid_mode uts_mode userns_mode dns_servers extra_hosts devices "
    "sysctl ulimit storage_opt",
    {
        "mount": _block(
            "type target source readonly bind_options volume_options tmpfs_options"
        ),
        "logging": _block("type driver", {"config": FREE}),
        "auth": _block("username password email server_address"),
        "healthchecks": _block("disable"),
    },
)
TASK = _block(
    "driver user kill_timeout kill_signal leader shutdown_delay kind",
    {
        "config": DOCKER_CONFIG,
        "env": FREE,
        "meta": FREE,
        "template": TEMPLATE,
        "resources": RESOURCES,
        "lifecycle": LIFECYCLE,
        "volume_mount": VOLUME_MOUNT,
        "service": SERVICE,
        "constraint": CONSTRAINT,
        "affinity": AFFINITY,
        "restart": RESTART,
        "logs": _block("max_files max_file_size disabled"),
        "artifact": _block(
            "source destination mode", {"options": FREE, "headers": FREE}
        ),
        "identity": _block("name aud env file ttl change_mode change_signal"),
    },
)
STRATEGY = FREE
SCALING_CHECK = _block(
    "source query query_window query_window_offset on_error group",
    {"strategy": STRATEGY},
    "strategy",
)
SCALING = _block(
    "enabled min max",
    {
        "policy": _block(
            "evaluation_interval cooldown on_check_error",
            {"check": SCALING_CHECK},
            "check",
        )
    },
)
GROUP = _block(
    "count shutdown_delay stop_after_client_disconnect max_client_disconnect "
    "prevent_reschedule_on_lost",
    {
        "task": TASK,
        "network": NETWORK,
        "service": SERVICE,
        "restart": RESTART,
        "reschedule": RESCHEDULE,
        "update": UPDATE,
        "scaling": SCALING,
        "volume": VOLUME,
        "constraint": CONSTRAINT,
        "affinity": AFFINITY,
        "spread": SPREAD,
        "meta": FREE,
        "ephemeral_disk": _block("migrate size sticky"),
        "migrate": _block(
            "max_parallel health_check min_healthy_time healthy_deadline"
        ),
        "disconnect": _block("lost_after replace reconcile stop_on_client_after"),
    },
    "task volume",
)
JOB = _block(
    "datacenters type region namespace priority all_at_once node_pool name",
    {
        "group": GROUP,
        "update": UPDATE,
        "reschedule": RESCHEDULE,
        "constraint": CONSTRAINT,
        "affinity": AFFINITY,
        "spread": SPREAD,
        "meta": FREE,
        "migrate": _block(
            "max_parallel health_check min_healthy_time healthy_deadline"
        ),
    },
    "group",
)
VARIABLE = _block(
    "type default description sensitive",
    {"validation": _block("condition error_message")},
)
FILE = _block("", {"variable": VARIABLE, "job": JOB, "locals": FREE}, "variable job")


def load(path: Path) -> dict[str, Any]:
    """A job (or var) file as python-hcl2's plain dict."""
    return parse(path.read_text())


def parse(text: str) -> dict[str, Any]:
    return dict(hcl2.loads(text, serialization_options=OPTIONS))


def schema_errors(
    document: Mapping[str, Any], spec: Block = FILE, at: str = ""
) -> list[str]:
    """Every attribute or block not allowed where it stands, by its path."""
    errors: list[str] = []
    for key, value in document.items():
        where = f"{at}.{key}" if at else key
        if spec.free:
            continue
        if key in spec.blocks and isinstance(value, list):
            child = spec.blocks[key]
            for item in value:
                if key in spec.labelled:
                    for label, body in item.items():
                        errors += schema_errors(body, child, f'{where} "{label}"')
                else:
                    errors += schema_errors(item, child, where)
        elif key in spec.attributes:
            continue
        else:
            errors.append(f"{where}: not an attribute or block Nomad knows here")
    return errors


# --- walking a parsed job ---------------------------------------------------------


def items(block: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The unlabelled child blocks of one type."""
    return list(block.get(kind, []))


def labelled(
    block: Mapping[str, Any], kind: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The labelled child blocks of one type, with their labels."""
    for item in block.get(kind, []):
        yield from item.items()


def job_of(document: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    ((name, job),) = list(labelled(document, "job"))
    return name, job


def tasks(
    job: Mapping[str, Any],
) -> Iterator[tuple[dict[str, Any], str, dict[str, Any]]]:
    """(group, task name, task) for every task of a job."""
    for _, group in labelled(job, "group"):
        for name, task in labelled(group, "task"):
            yield group, name, task


def services(job: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for _, group in labelled(job, "group"):
        yield from items(group, "service")
        for _, task in labelled(group, "task"):
            yield from items(task, "service")


def variables(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Declared variables: name -> their block."""
    return dict(labelled(document, "variable"))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(text: str) -> float:
    """A Nomad duration ("90s", "1m30s", "1h") in seconds."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_VAR = re.compile(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)")


def referenced_variables(value: Any) -> set[str]:
    """Names of `var.X` used anywhere in a parsed value."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for item in value.values():
            found |= referenced_variables(item)
    elif isinstance(value, list):
        for item in value:
            found |= referenced_variables(item)
    elif isinstance(value, str):
        for expression in _REFERENCE.findall(value):
            found |= set(_VAR.findall(expression))
    return found


def resolve(value: Any, values: Mapping[str, Any]) -> Any:
    """A value with `${var.X}` and `${var.X + N}` evaluated from `values`."""
    if not isinstance(value, str):
        return value
    whole = re.fullmatch(r"\$\{var\.(\w+)\}", value)
    if whole:
        return values[whole.group(1)]

    def evaluate(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        sum_ = re.fullmatch(r"var\.(\w+)\s*([+-])\s*(\d+)", expression)
        if sum_:
            base = float(values[sum_.group(1)])
            delta = float(sum_.group(3))
            result = base + delta if sum_.group(2) == "+" else base - delta
            return f"{result:g}"
        plain = re.fullmatch(r"var\.(\w+)", expression)
        if plain:
            return str(values[plain.group(1)])
        return match.group(0)

    return _REFERENCE.sub(evaluate, value)


def template_data(template: Mapping[str, Any]) -> str:
    """A template's text as Nomad renders it from (python-hcl2 keeps escapes)."""
    return str(template.get("data", "")).replace('\\"', '"')


def env_lines(text: str) -> dict[str, str]:
    """NAME=value lines of an env template (Go template lines left out)."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def task_environment(task: Mapping[str, Any]) -> dict[str, str]:
    """Every variable a task sets: env blocks and env templates."""
    found: dict[str, str] = {}
    for env in items(task, "env"):
        found.update({k: str(v) for k, v in env.items()})
    for template in items(task, "template"):
        if template.get("env"):
            found.update(env_lines(template_data(template)))
    return found
