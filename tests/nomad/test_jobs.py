"""The Nomad job files parse and follow Nomad's job specification and ours."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from gpu_node.settings import GpuNodeSettings
from jobs.settings import JobsSettings
from sdapi.infra.settings import CommonSettings
from tests.nomad.jobspec import (
    NOMAD_DIR,
    items,
    job_of,
    labelled,
    load,
    parse,
    referenced_variables,
    resolve,
    schema_errors,
    seconds,
    services,
    task_environment,
    tasks,
    template_data,
    variables,
)
from tests.nomad.rules import (
    SECRET_NAME,
    check_errors,
    device_errors,
    literal_secrets,
    policy_errors,
    scaling_errors,
    update_errors,
)
from web.settings import WebSettings

JOBS = ("web", "jobs", "gpu-node", "redis", "postgres", "traefik", "garage")
ENVIRONMENTS = ("production", "staging")
MODELS = sorted(
    p.stem.removesuffix(".vars") for p in (NOMAD_DIR / "vars/models").glob("*.vars.hcl")
)
# The settings class each `sdapi <command>` builds.
SETTINGS: dict[str, type[BaseSettings]] = {
    "web": WebSettings,
    "jobs": JobsSettings,
    "gpu-node": GpuNodeSettings,
    "migrate": CommonSettings,
}


def job_path(name: str) -> Path:
    return NOMAD_DIR / f"{name}.nomad.hcl"


def env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: prefix + field name."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name in settings.model_fields}


def var_values(job: str, *files: Path) -> dict[str, Any]:
    """The job's variables: defaults, then the var files in order."""
    values = {
        name: block["default"]
        for name, block in variables(load(job_path(job))).items()
        if "default" in block
    }
    for path in files:
        values.update(load(path))
    return values


def environment_files(job: str, environment: str) -> list[list[Path]]:
    """The var file sets a job is run with in an environment (a GPU job per model)."""
    base = NOMAD_DIR / "vars" / f"{environment}.{job}.vars.hcl"
    if job != "gpu-node":
        return [[base]]
    return [[base, NOMAD_DIR / "vars/models" / f"{model}.vars.hcl"] for model in MODELS]


def all_runs() -> list[tuple[str, list[Path]]]:
    return [
        (job, files)
        for job in JOBS
        for environment in ENVIRONMENTS
        for files in environment_files(job, environment)
    ]


def run_id(run: tuple[str, list[Path]]) -> str:
    return "+".join(path.name.removesuffix(".vars.hcl") for path in run[1])


@pytest.fixture(params=JOBS)
def job_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def document(job_name: str) -> dict[str, Any]:
    return load(job_path(job_name))


def test_every_process_and_server_has_a_job_file() -> None:
    assert sorted(p.name for p in NOMAD_DIR.glob("*.nomad.hcl")) == sorted(
        f"{name}.nomad.hcl" for name in JOBS
    )


def test_a_job_file_starts_with_its_variables(job_name: str) -> None:
    text = job_path(job_name).read_text()
    code = [
        line for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    first_job = next(i for i, line in enumerate(code) if line.startswith("job "))
    assert code[0].startswith("variable ")
    assert all(not line.startswith("variable ") for line in code[first_job:])


def test_the_job_follows_nomads_schema(document: dict[str, Any]) -> None:
    assert schema_errors(document) == []


def test_a_misspelt_attribute_is_caught() -> None:
    text = job_path("web").read_text()
    assert "count = var.web_count" in text
    typo = text.replace("count = var.web_count", "cuont = var.web_count")
    errors = schema_errors(parse(typo))
    assert errors == [
        'job "sdapi-web".group "web".cuont: not an attribute or block Nomad knows here'
    ]
    # A block where an attribute belongs, and one nested too deep, are caught too.
    moved = text.replace('kill_timeout = "30s"', 'restart_timeout = "30s"', 1)
    assert any("restart_timeout" in error for error in schema_errors(parse(moved)))


def test_every_variable_used_is_declared_and_described(
    document: dict[str, Any],
) -> None:
    declared = variables(document)
    _, job = job_of(document)
    assert referenced_variables(job) <= set(declared)
    for name, block in declared.items():
        assert block.get("description"), f"variable {name} has no description"
        assert "type" in block, f"variable {name} has no type"


def test_the_job_passes_the_rules(document: dict[str, Any]) -> None:
    _, job = job_of(document)
    assert device_errors(job) == []
    assert update_errors(job) == []
    assert policy_errors(job) == []
    assert check_errors(job) == []


def rules_of(job_name: str, old: str, new: str) -> list[str]:
    """The rules' findings for a job file with `old` replaced by `new`."""
    text = job_path(job_name).read_text()
    assert old in text
    _, job = job_of(parse(text.replace(old, new, 1)))
    return (
        device_errors(job) + update_errors(job) + policy_errors(job) + check_errors(job)
    )


def test_a_device_outside_the_docker_driver_is_caught() -> None:
    assert rules_of("gpu-node", 'driver = "docker"', 'driver = "exec"') == [
        "task gpu-node: a device with driver exec"
    ]


def test_a_progress_deadline_within_the_healthy_deadline_is_caught() -> None:
    found = rules_of("web", 'progress_deadline = "10m"', 'progress_deadline = "2m"')
    assert found == ["progress_deadline must exceed healthy_deadline"]


def test_an_update_without_auto_revert_is_caught() -> None:
    found = rules_of("jobs", "auto_revert       = true", "auto_revert = false")
    assert found == ["update without auto_revert"]


def test_a_check_without_a_timeout_is_caught() -> None:
    found = rules_of("redis", 'timeout  = "2s"', "")
    assert found == ["service sdapi-redis check tcp: interval and timeout are required"]


def test_a_group_without_a_reschedule_policy_is_caught() -> None:
    found = rules_of("postgres", "reschedule {", "ephemeral_disk {")
    assert found == ["group postgres: no reschedule block"]


@pytest.mark.parametrize("run", all_runs(), ids=run_id)
def test_counts_lie_within_the_scaling_bounds(run: tuple[str, list[Path]]) -> None:
    job_name, files = run
    _, job = job_of(load(job_path(job_name)))
    assert scaling_errors(job, var_values(job_name, *files)) == []


def test_a_count_beyond_the_scaling_maximum_is_caught() -> None:
    _, job = job_of(load(job_path("gpu-node")))
    values = var_values("gpu-node", NOMAD_DIR / "vars/models/tiny.vars.hcl")
    assert scaling_errors(job, {**values, "gpu_count": 9, "gpu_max": 4}) == [
        "group node: not min 0 <= count 9 <= max 4"
    ]


@pytest.mark.parametrize("run", all_runs(), ids=run_id)
def test_var_files_set_declared_variables_and_every_required_one(
    run: tuple[str, list[Path]],
) -> None:
    job_name, files = run
    declared = variables(load(job_path(job_name)))
    given: dict[str, Any] = {}
    for path in files:
        values = load(path)
        assert set(values) <= set(declared), path.name
        assert not [name for name in values if SECRET_NAME.search(name)], path.name
        given.update(values)
    required = {name for name, block in declared.items() if "default" not in block}
    assert required <= set(given)


def test_every_environment_has_a_var_file_per_job() -> None:
    found = {p.name for p in (NOMAD_DIR / "vars").glob("*.vars.hcl")}
    assert found == {f"{e}.{j}.vars.hcl" for e in ENVIRONMENTS for j in JOBS}


def test_the_gpu_node_drains_before_nomad_kills_it() -> None:
    _, job = job_of(load(job_path("gpu-node")))
    for model in MODELS:
        values = var_values(
            "gpu-node",
            NOMAD_DIR / "vars/production.gpu-node.vars.hcl",
            NOMAD_DIR / "vars/models" / f"{model}.vars.hcl",
        )
        ((_, _, task),) = list(tasks(job))
        grace = float(
            resolve(task_environment(task)["SDAPI_GPU_DRAIN_GRACE_S"], values)
        )
        kill = seconds(resolve(task["kill_timeout"], values))
        # The node hands back unfinished work after the grace: time for that too.
        assert kill >= grace + 15


def test_the_gpu_node_scales_on_the_queue_depth_web_exports() -> None:
    _, job = job_of(load(job_path("gpu-node")))
    ((_, group),) = list(labelled(job, "group"))
    ((scaling,),) = [items(group, "scaling")]
    assert scaling["enabled"] is True
    ((policy,),) = [items(scaling, "policy")]
    ((_, check),) = list(labelled(policy, "check"))
    assert check["source"] == "prometheus"
    assert 'sdapi_queue_depth{model="${var.model_name}"}' in check["query"]
    ((strategy, options),) = list(labelled(check, "strategy"))
    assert strategy == "target-value"
    assert options["target"] == "${var.queue_per_node}"
    assert 'sdapi_scheduled_generations{model="${var.model_name}"}' in check["query"]
    assert 'sdapi_healthy_gpu_nodes{model="${var.model_name}"}' in check["query"]
    web_metrics = (Path(__file__).parents[2] / "web/metrics.py").read_text()
    assert '"sdapi_queue_depth"' in web_metrics and '["model", "tier"]' in web_metrics
    for name in ("sdapi_healthy_gpu_nodes", "sdapi_scheduled_generations"):
        assert f'"{name}"' in web_metrics
    # The model is a variable, the device a GPU with enough memory.
    ((_, _, task),) = list(tasks(job))
    ((resources,),) = [items(task, "resources")]
    ((name, device),) = list(labelled(resources, "device"))
    assert name == "nvidia/gpu"
    ((constraint,),) = [items(device, "constraint")]
    assert constraint["attribute"] == "${device.attr.memory}"
    assert task_environment(task)["SDAPI_MODEL"] == "${var.model}"
    ((_, volume),) = list(labelled(group, "volume"))
    assert volume["type"] == "host"


def test_the_traefik_ingress_routes_to_webs_tagged_service() -> None:
    _, web = job_of(load(job_path("web")))
    (service,) = [
        s for s in services(web) if "traefik.enable=true" in s.get("tags", [])
    ]
    (check,) = [c for c in items(service, "check") if c["name"] == "ready"]
    assert check["path"] == "/readyz"
    _, traefik = job_of(load(job_path("traefik")))
    ((_, _, task),) = list(tasks(traefik))
    ((template,),) = [items(task, "template")]
    config = template_data(template)
    assert "consulCatalog:" in config
    assert "exposedByDefault: false" in config
    assert 'strictChecks: ["passing"]' in config


def test_redis_keeps_its_queues() -> None:
    _, job = job_of(load(job_path("redis")))
    ((_, group),) = list(labelled(job, "group"))
    ((_, volume),) = list(labelled(group, "volume"))
    assert volume["type"] == "host"
    ((_, _, task),) = list(tasks(job))
    ((template,),) = [items(task, "template")]
    config = template_data(template)
    assert "appendonly yes" in config
    assert "maxmemory-policy noeviction" in config
    ((mount,),) = [items(task, "volume_mount")]
    assert "dir /data" in config and mount["destination"] == "/data"


def test_postgres_keeps_its_data_on_a_host_volume() -> None:
    _, job = job_of(load(job_path("postgres")))
    ((_, group),) = list(labelled(job, "group"))
    ((_, volume),) = list(labelled(group, "volume"))
    assert volume["type"] == "host"
    ((_, _, task),) = list(tasks(job))
    env = task_environment(task)
    ((mount,),) = [items(task, "volume_mount")]
    assert env["PGDATA"].startswith(mount["destination"] + "/")


def test_migrations_run_before_web_starts() -> None:
    _, job = job_of(load(job_path("web")))
    (migrate,) = [task for _, name, task in tasks(job) if name == "migrate"]
    ((lifecycle,),) = [items(migrate, "lifecycle")]
    assert lifecycle == {"hook": "prestart", "sidecar": False}
    ((config,),) = [items(migrate, "config")]
    assert config["args"] == ["migrate"]


# --- environment variables and secrets -------------------------------------------


def sdapi_tasks() -> list[tuple[str, str, dict[str, Any]]]:
    """(job, sdapi command, task) for every task running `sdapi <command>`."""
    found = []
    for job_name in JOBS:
        _, job = job_of(load(job_path(job_name)))
        for _, _, task in tasks(job):
            ((config,),) = [items(task, "config")]
            if config.get("image", "").endswith(("var.image}", "var.gpu_image}")):
                found.append((job_name, config["args"][0], task))
    return found


def test_sdapi_tasks_are_found() -> None:
    assert sorted({command for _, command, _ in sdapi_tasks()}) == sorted(SETTINGS)


@pytest.mark.parametrize(
    ("job_name", "command", "task"), sdapi_tasks(), ids=lambda v: str(v)[:20]
)
def test_every_sdapi_variable_a_job_sets_is_a_setting_of_its_process(
    job_name: str, command: str, task: dict[str, Any]
) -> None:
    known = env_names(SETTINGS[command])
    set_here = {name for name in task_environment(task) if name.startswith("SDAPI_")}
    assert set_here, job_name
    assert set_here - known == set()


def test_sdapi_is_configured_through_templates_only() -> None:
    for job_name, _, task in sdapi_tasks():
        for env in items(task, "env"):
            assert not [name for name in env if name.startswith("SDAPI_")], job_name
        assert any(template.get("env") for template in items(task, "template"))


def test_env_names_follow_the_settings_prefix() -> None:
    # Guards the introspection above against a renamed prefix.
    assert "SDAPI_GPU_DRAIN_GRACE_S" in env_names(GpuNodeSettings)
    assert "SDAPI_SMTP_URL" in env_names(JobsSettings)
    assert "SDAPI_SMTP_URL" not in env_names(WebSettings)
    assert "SDAPI_DATABASE_URL" in env_names(CommonSettings)


def test_no_job_holds_a_literal_secret(document: dict[str, Any]) -> None:
    _, job = job_of(document)
    for _, name, task in tasks(job):
        assert literal_secrets(task) == [], name


def test_a_literal_password_is_caught() -> None:
    task = {
        "template": [
            {
                "env": True,
                "data": "SDAPI_DATABASE_URL=postgres://sdapi:hunter2@db/sdapi\n"
                "SDAPI_SECRET_KEY=abc",
            }
        ],
        "env": [{"POSTGRES_PASSWORD": "hunter2"}],
    }
    assert sorted(literal_secrets(task)) == [
        "POSTGRES_PASSWORD",
        "SDAPI_DATABASE_URL",
        "SDAPI_SECRET_KEY",
    ]
    from_elsewhere = {
        "template": [{"env": True, "data": "SDAPI_SECRET_KEY={{ .secret_key }}"}]
    }
    assert literal_secrets(from_elsewhere) == [
        "a template reads values from somewhere else than nomadVar"
    ]


# The image store's settings and credentials (web and jobs).
STORE = ("SDAPI_STORAGE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_secrets_come_from_nomad_variables() -> None:
    wanted = {
        "web": ("SDAPI_DATABASE_URL", "SDAPI_SECRET_KEY", *STORE),
        "jobs": ("SDAPI_DATABASE_URL", "SDAPI_SECRET_KEY", "SDAPI_SMTP_URL", *STORE),
        "postgres": ("POSTGRES_PASSWORD",),
    }
    for job_name, names in wanted.items():
        text = job_path(job_name).read_text()
        assert f'nomadVar "nomad/jobs/sdapi-{job_name}"' in text
        _, job = job_of(load(job_path(job_name)))
        for _, _, task in tasks(job):
            env = task_environment(task)
            for name in names:
                if name in env:
                    assert "{{ ." in env[name]


def env_of(job_name: str, task_name: str) -> dict[str, str]:
    _, job = job_of(load(job_path(job_name)))
    (task,) = [task for _, name, task in tasks(job) if name == task_name]
    return task_environment(task)


def test_web_and_jobs_read_the_same_store_from_their_variables() -> None:
    """Every image is written by jobs and read by web: one store, one key."""
    web, jobs = env_of("web", "web"), env_of("jobs", "jobs")
    assert web["SDAPI_STORAGE_REDIRECT"] == "{{ . }}"
    for name in STORE:
        assert web[name] == jobs[name] == "{{ . }}", name
    for job_name in ("web", "jobs"):
        text = job_path(job_name).read_text()
        # Optional: a Variable without them keeps the images in PostgreSQL
        # (a missing key would render "<no value>" and stop the process).
        for key in ("storage_url", "s3_access_key_id", "s3_secret_access_key"):
            assert f"{{{{- with .{key} }}}}" in text, (job_name, key)
    # The store's settings are read by the processes that get them.
    assert {"SDAPI_STORAGE_URL", "SDAPI_STORAGE_REDIRECT"} <= env_names(WebSettings)
    assert "SDAPI_STORAGE_URL" in env_names(JobsSettings)


def garage_config() -> str:
    _, job = job_of(load(job_path("garage")))
    ((_, _, task),) = list(tasks(job))
    ((template,),) = [items(task, "template")]
    assert template["destination"].startswith("secrets/")
    return template_data(template)


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_garage_keeps_as_many_copies_as_it_has_machines_for(environment: str) -> None:
    values = var_values("garage", *environment_files("garage", environment)[0])
    assert 1 <= values["replication_factor"] <= values["garage_count"]
    _, job = job_of(load(job_path("garage")))
    ((_, group),) = list(labelled(job, "group"))
    assert {"operator": "distinct_hosts", "value": "true"} in items(group, "constraint")
    assert "replication_factor = ${var.replication_factor}" in garage_config()


def test_garage_keeps_its_data_on_a_host_volume_and_its_secrets_in_variables() -> None:
    _, job = job_of(load(job_path("garage")))
    ((_, group),) = list(labelled(job, "group"))
    ((_, volume),) = list(labelled(group, "volume"))
    assert volume["type"] == "host"
    ((_, _, task),) = list(tasks(job))
    ((mount,),) = [items(task, "volume_mount")]
    config = garage_config()
    for key in ("metadata_dir", "data_dir"):
        (line,) = [line for line in config.splitlines() if line.startswith(key)]
        assert line.split("=")[1].strip().strip('"').startswith(mount["destination"])
    assert 'rpc_secret = "{{ .rpc_secret }}"' in config
    assert 'admin_token = "{{ .admin_token }}"' in config
    assert 'nomadVar "nomad/jobs/sdapi-garage"' in config
    ((config_block,),) = [items(task, "config")]
    assert config_block["args"][:2] == ["-c", "/secrets/garage.toml"]


def test_the_s3_endpoint_is_routed_by_host_and_checked_by_garage() -> None:
    _, job = job_of(load(job_path("garage")))
    (service,) = list(services(job))
    assert "traefik.enable=true" in service["tags"]
    assert (
        "traefik.http.routers.sdapi-s3.rule=Host(`${var.s3_host}`)" in (service["tags"])
    )
    (check,) = items(service, "check")
    assert (check["port"], check["path"]) == ("admin", "/health")
    config = garage_config()
    # Garage listens where Nomad gave it ports, and signs for the region
    # that SDAPI_STORAGE_URL names.
    for port in ("s3", "rpc", "admin"):
        assert f'{{{{ env "NOMAD_PORT_{port}" }}}}' in config
    assert 's3_region = "${var.s3_region}"' in config
    assert 'consul_http_addr = "http://127.0.0.1:8500"' in config


_IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_URL_HOST = re.compile(r"[a-z]+://(?:[^@/\n]*@)?([A-Za-z0-9.\-{}]+)")


def test_no_addresses_but_consul_names_and_the_local_agent(job_name: str) -> None:
    text = job_path(job_name).read_text()
    assert set(_IP.findall(text)) <= {"127.0.0.1", "0.0.0.0"}  # noqa: S104
    for host in _URL_HOST.findall(text):
        if host in {"127.0.0.1", "{{"} or host.startswith("{{"):
            continue
        assert host.endswith(".service.consul") or host.startswith(
            ("download.pytorch.org", "developer.hashicorp.com")
        ), host
