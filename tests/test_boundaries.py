"""Import boundaries, checked at run time (import-linter checks them statically).

A web replica has no GPU: importing the web app must not load torch or
diffusers. A GPU node has no database or SMTP: importing the node's worker
must not load Tortoise, aiosmtplib, aiohttp-session or the web/jobs packages.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest


def _loaded_after(imports: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in imports)
        + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout))


@pytest.mark.parametrize(
    "imports",
    [
        ["web.app", "web.main"],
        ["jobs.worker", "jobs.main"],
        ["sdapi.cli"],
    ],
)
def test_web_and_jobs_never_load_torch(imports: list[str]) -> None:
    loaded = _loaded_after(imports)
    assert not loaded & {"torch", "diffusers", "transformers", "safetensors"}


def test_gpu_node_never_loads_web_jobs_tortoise_or_smtp() -> None:
    loaded = _loaded_after(["gpu_node.main", "gpu_node.node"])
    assert not loaded & {
        "web",
        "jobs",
        "tortoise",
        "aiosmtplib",
        "aiosmtpd",
        "aiohttp_session",
        "asyncpg",
    }


def test_gpu_node_loads_torch_only_with_a_model() -> None:
    # Only gpu_node.pipeline and gpu_node.tiny import torch, lazily: the node's
    # queues, progress and Consul code start and test without it.
    loaded = _loaded_after(["gpu_node.main", "gpu_node.node", "gpu_node.weights"])
    assert not loaded & {"torch", "diffusers", "transformers", "safetensors"}


def test_gpu_node_contract_is_pydantic_only() -> None:
    loaded = _loaded_after(["sdapi.contract"])
    assert not loaded & {"torch", "diffusers", "redis", "arq", "aiohttp", "tortoise"}


def test_benchmarks_never_import_the_tests() -> None:
    # What bench/ and tests/ share lives in sdapi/devtools or gpu_node.
    bench = Path(__file__).resolve().parents[1] / "bench"
    imported = set()
    for script in bench.glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add((script.name, node.module))
            elif isinstance(node, ast.Import):
                imported.update((script.name, alias.name) for alias in node.names)
    assert not {
        (name, module)
        for name, module in imported
        if module == "tests" or module.startswith("tests.")
    }
