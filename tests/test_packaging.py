"""The wheel alone makes a working service: package data, then a clean install."""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import aiohttp
import pytest

from sdapi.devtools.net import free_port
from tests.support import until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdapi", "web", "jobs", "gpu_node")
# The CPU build that lies on disk here; installed first so the gpu extra's torch
# range is already satisfied and pip downloads no CUDA build.
TORCH_SPEC = "torch==2.13.0"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 45


def build_wheel(folder: Path) -> Path:
    """`pip wheel .` of a clean copy of this checkout into `folder`; its path."""
    # A copy: setuptools keeps build/ in the source tree, and files left there
    # by an older build would end up in the wheel.
    source = folder / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            source / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    # No build isolation: the build backend is already in this venv, and an
    # isolated build would fetch setuptools from the index on every run.
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
            "--no-build-isolation", "--quiet", "-w", str(folder),
        ],
        check=True,
        cwd=folder,
    )  # fmt: skip
    (wheel,) = folder.glob("sdapi-*.whl")
    return wheel


def source_files() -> set[str]:
    """Every file of the packages a process may read at run time."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_every_file_of_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = {name for name in archive.namelist() if ".dist-info/" not in name}
    missing = source_files() - names
    assert missing == set(), f"left out of the wheel: {sorted(missing)}"
    # Nothing else either: no tests, no leftovers of an older build.
    assert names - source_files() == set()
    assert "sdapi/db/templates/email/generation_ready.txt" in names
    assert "gpu_node/data/bpe_simple_vocab_16e6.txt.gz" in names
    assert "gpu_node/data/CLIP-LICENSE.txt" in names
    assert "gpu_node/data/checkpoints/sd_xl_base.yaml" in names
    assert "gpu_node/data/checkpoints/sd2/text_encoder/config.json" in names


# --- a clean install running `sdapi dev` ------------------------------------------


def make_venv(folder: Path, wheel: Path) -> Path:
    """A new virtual environment with torch, then the wheel and its gpu extra."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # Byte-compiling every file of torch and its neighbours was most of this
    # test's time; Python compiles what the service imports when it runs.
    install = [*pip, "install", "--no-compile"]
    subprocess.run([*install, TORCH_SPEC], check=True)
    subprocess.run([*install, f"{wheel}[gpu,local]"], check=True)
    # The tokenizer once came from open_clip, which only scripts/setup
    # installed: the clean install must do without it.
    has_open_clip = "import importlib.util as u; print(u.find_spec('open_clip'))"
    found = subprocess.run(
        [str(python), "-c", has_open_clip], check=True, capture_output=True, text=True
    )
    assert found.stdout.strip() == "None"
    return folder / "bin"


def clean_env(data_dir: Path, **settings: object) -> dict[str, str]:
    """An environment naming nothing of this checkout: no SDAPI_*, no PYTHONPATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SDAPI_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["SDAPI_DATA_DIR"] = str(data_dir)
    env.update({f"SDAPI_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    # torch's per-core threads spin against each other on two cores.
    env["OMP_NUM_THREADS"] = "1"
    return env


def first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                return process.stdout.readline().decode()
            if process.poll() is not None:
                pytest.fail(f"sdapi dev exited with {process.returncode}")
    pytest.fail(f"sdapi dev printed nothing in {timeout}s")


async def wait_for_file(folder: Path, pattern: str, timeout: float) -> Path:
    found = await until(
        lambda: sorted(folder.glob(pattern)), timeout, pattern, every=0.1
    )
    return found[0]


async def premium_image(base_url: str, mail_dir: Path, set_premium: Path) -> bytes:
    """Sign up, verify by mail, get premium from the CLI, generate, download."""
    email, password = "wheel@example.org", "a wheel, alone, works"
    account = {"email": email, "password": password}
    api = f"{base_url}/api/v1"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{api}/auth/signup", json=account) as response:
            assert response.status in (200, 201), await response.text()
        mail = await wait_for_file(mail_dir, "*.eml", 30)
        link = re.search(r"http://\S*verify\?token=[A-Za-z0-9_-]+", mail.read_text())
        assert link, mail.read_text()
        verify = link.group(0)
        async with http.get(verify, headers={"Accept": "application/json"}) as response:
            assert response.status == 200, await response.text()
        async with http.post(f"{api}/auth/signin", json=account) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["token"]
        # The wheel's own command line, in the same data folder as `sdapi dev`.
        process = await asyncio.create_subprocess_exec(
            str(set_premium), "user", "set-premium", email, "--days", "1",
            cwd=mail_dir.parent.parent, env=clean_env(mail_dir.parent),
        )  # fmt: skip
        assert await process.wait() == 0
        auth = {"Authorization": f"Bearer {token}"}
        request = {"prompt": "a wheel", "width": 64, "height": 64, "steps": 2}
        async with http.post(
            f"{api}/generations", json=request, headers=auth
        ) as response:
            assert response.status == 202, await response.text()
            generation = await response.json()
            assert generation["tier"] == "premium", generation

        async def finished() -> str | None:
            async with http.get(
                f"{api}/generations/{generation['id']}", headers=auth
            ) as response:
                status: str = (await response.json())["status"]
            return None if status in ("queued", "running", "scheduled") else status

        status = await until(finished, 120, "the generation", every=0.2)
        assert status == "succeeded"
        async with http.get(
            f"{api}/generations/{generation['id']}/images/0", headers=auth
        ) as response:
            assert response.status == 200
            return await response.read()


@pytest.mark.slow
def test_a_clean_install_of_the_wheel_serves_a_premium_image(
    wheel: Path, tmp_path: Path
) -> None:
    bin_dir = make_venv(tmp_path / "venv", wheel)
    home = tmp_path / "home"
    data_dir = home / "data"
    home.mkdir()
    env = clean_env(data_dir, port=free_port())
    with (tmp_path / "dev.stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [str(bin_dir / "sdapi"), "dev"],
            cwd=home,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    try:
        line = first_line(process, START_TIMEOUT_S)
        found = re.search(r"open (http://\S+)/ \(the playground", line)
        assert found, line
        png = asyncio.run(
            premium_image(found.group(1), data_dir / "mail", bin_dir / "sdapi")
        )
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    assert code == 0, (tmp_path / "dev.stderr").read_text()[-4000:]
    # The install really was the wheel's: nothing came from this checkout.
    log = (tmp_path / "dev.stderr").read_text()
    # (with the separator: a temporary folder may share the checkout's prefix)
    assert f"{ROOT}{os.sep}" not in log
