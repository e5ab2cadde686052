"""The playground in a real Chromium, against real web, jobs and GPU node processes.

Chromium is Debian's (scripts/setup installs it), driven by playwright's
Python package; a machine where it cannot start fails these tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiosmtpd.controller import Controller
from playwright.sync_api import (
    Browser,
    Page,
    Playwright,
    Route,
    expect,
    sync_playwright,
)

from sdapi.db.connection import open_database, truncate_all
from sdapi.db.models import User, utcnow
from sdapi.devtools.net import free_port
from tests.e2e.conftest import (
    Mailbox,
    Service,
    Services,
    node_env,
    own_redis_db,
    sdapi_env,
    start_services,
)
from tests.gpu_node.lora_support import write_lora
from tests.support import until_sync

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
REDIS_DB = 12
PASSWORD = "correct horse battery"
SHOTS = Path("/tmp/playground-shots")  # noqa: S108 (kept for a person to look at)
# Web knows three models; the node serves two of them and keeps one loaded
# (a RAM budget of 0), so the picker has one model in each state.
WEB_MODELS = "tiny,other=tiny,spare=tiny"
NODE_MODELS = "tiny,other=tiny"
LORA = "fox-style"
LORA_TRIGGERS = {"red fox": 9, "autumn": 4}


@dataclass
class Stack:
    base_url: str
    mailbox: Mailbox
    database_url: str
    services: Services


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("playground-e2e")
    own_redis = own_redis_db(redis_url, REDIS_DB)
    asyncio.run(truncate_all(database_url))
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    common: dict[str, object] = {
        "database_url": database_url,
        "redis_url": own_redis,
        "data_dir": root / "data",
        "secret_key": "e2e-secret-key",
        "public_url": base_url,
    }
    web_common = {**common, "models": WEB_MODELS}
    services = Services()
    services.add(
        Service("web", "web", sdapi_env(**web_common, port=port, bcrypt_rounds=4), root)
    )
    services.add(
        Service(
            "jobs",
            "jobs",
            sdapi_env(
                **web_common,
                smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                outbox_interval=0.2,
            ),
            root,
        )
    )
    lora_dir = root / "loras"
    lora_dir.mkdir()
    write_lora(lora_dir / f"{LORA}.safetensors", seed=7, tags=LORA_TRIGGERS)
    node = node_env(
        {**common, "models": NODE_MODELS},
        e2e_model_dir,
        "playground-node",
        gpu_preview_every=1,
        gpu_progress_interval_s=0,
        gpu_ram_budget_bytes=0,
        lora_dir=lora_dir,
    )
    services.add(Service("gpu-node", "gpu-node", node, root))
    try:
        start_services(services, base_url, own_redis)
        yield Stack(base_url, mailbox, database_url, services)
    finally:
        services.stop()
        smtp.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # No skip: a machine that cannot start Chromium fails here.
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@dataclass
class Visit:
    """One test's page, with every request the page made."""

    page: Page
    requests: list[str]


@pytest.fixture
def visit(
    stack: Stack, browser: Browser, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Visit]:
    context = browser.new_context(
        base_url=stack.base_url, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    seen = Visit(page, [])
    page.on("request", lambda req: seen.requests.append(req.url))
    try:
        yield seen
    finally:
        shot = tmp_path / f"{request.node.name}.png"
        page.screenshot(path=str(shot), full_page=True)
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(shot, SHOTS / shot.name)
        context.close()
        # No request leaves this machine: no CDN, font or script elsewhere.
        hosts = {
            urlsplit(url).hostname
            for url in seen.requests
            if not url.startswith("data:")
        }
        assert hosts <= {"127.0.0.1"}, hosts


def _db(stack: Stack, work: Any) -> Any:
    """Run `work()` with the database open, on a thread of its own: playwright's
    sync API keeps an event loop running on this one."""

    async def run() -> Any:
        async with open_database(stack.database_url):
            return await work()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result()


def account(stack: Stack, page: Page, *, premium: bool) -> str:
    """A verified account (premium or not), signed in through the page."""
    email = f"pg-{uuid.uuid4().hex[:8]}@example.org"
    response = page.request.post(
        "/api/v1/auth/signup", data={"email": email, "password": PASSWORD}
    )
    assert response.status == 201, response.text()

    async def verify() -> None:
        changes: dict[str, Any] = {"email_verified_at": utcnow()}
        if premium:
            changes["premium_until"] = utcnow() + timedelta(days=30)
        await User.filter(email_key=email).update(**changes)

    _db(stack, verify)
    sign_in(page, email)
    return email


def sign_in(page: Page, email: str) -> None:
    page.goto("/signin")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()


def fill(page: Page, **fields: Any) -> None:
    for name, value in fields.items():
        page.locator(f"#generate-form [name={name}]").fill(str(value))


def test_sign_up_verify_by_email_and_sign_in(visit: Visit, stack: Stack) -> None:
    page = visit.page
    email = f"new-{uuid.uuid4().hex[:8]}@example.org"
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/signin\?next=/$"))
    page.get_by_role("link", name="Sign up").first.click()
    page.get_by_label("Email").fill(email)
    page.get_by_label("Name (optional)").fill("Ada")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    expect(page.locator("#address")).to_have_text(email)

    def verification_link() -> str | None:
        for message in stack.mailbox.messages:
            if message["To"] == email:
                body = message.get_body(preferencelist=("plain",))
                found = re.search(r"http://\S+verify\?token=[\w-]+", body.get_content())
                if found:
                    return found.group(0)
        return None

    link = until_sync(verification_link, 30, "the verification email")
    page.goto(link)
    expect(page.get_by_role("heading", name="Email address verified")).to_be_visible()
    sign_in(page, email)
    expect(page.locator(".who .email")).to_have_text(email)
    expect(page.locator(".badge")).to_have_text("normal")


def test_premium_run_shows_progress_a_preview_then_the_image(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    account(stack, page, premium=True)
    fill(page, prompt="a quiet harbour", width=64, height=64, steps=150)
    page.get_by_role("button", name="Generate").click()
    run = page.locator(".run").first
    # The bar advances and a preview appears while it runs...
    expect(run.locator(".steps")).to_have_text(re.compile(r"Step \d+ of 150"))
    expect(run.locator(".preview")).to_be_visible()
    # ...then the image, with the settings used.
    expect(run.locator(".status")).to_have_text("succeeded", timeout=60_000)
    image = run.locator(".images img")
    expect(image).to_have_count(1)
    expect(run.locator(".run-meta")).to_contain_text("took")
    pushed = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    href = run.get_by_role("link", name="Download").get_attribute("href")
    downloaded = page.request.get(href)
    assert downloaded.ok and downloaded.body() == pushed

    # "Use these settings again" fills the form with the seed that was used.
    run.get_by_role("button", name="Use these settings again").click()
    expect(page.locator("#random-seed")).not_to_be_checked()
    assert page.locator("#seed").input_value().isdigit()
    expect(page.locator("#prompt")).to_have_value("a quiet harbour")

    # A second, long run is cancelled while it runs.
    fill(page, prompt="a long night", width=128, height=128, steps=150)
    page.get_by_role("button", name="Generate").click()
    second = page.locator(".run").first
    expect(second.locator(".steps")).to_have_text(re.compile(r"Step \d+ of 150"))
    second.get_by_role("button", name="Cancel").click()
    expect(second.locator(".status")).to_have_text("cancelled", timeout=30_000)


def test_two_runs_at_once_finish_in_their_own_cards(visit: Visit, stack: Stack) -> None:
    page = visit.page
    account(stack, page, premium=True)
    runs = page.locator(".run")
    for count, prompt in enumerate(("first of two", "second of two"), start=1):
        fill(page, prompt=prompt, width=64, height=64, steps=150)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator('[data-error-for="form"]')).to_be_empty()
        expect(runs).to_have_count(count, timeout=15_000)
    for prompt in ("first of two", "second of two"):
        card = runs.filter(has_text=prompt)
        expect(card.locator(".status")).to_have_text("succeeded", timeout=60_000)
        expect(card.locator(".images img")).to_have_count(1)


def test_a_run_sent_before_the_models_arrive_waits_for_them(
    visit: Visit, stack: Stack
) -> None:
    # The form shows, and takes a click, before the list of models is back:
    # what was typed stays, and the run goes out with the chosen model.
    page = visit.page
    account(stack, page, premium=True)
    held: list[Route] = []
    page.route("**/api/v1/models", lambda route: held.append(route))
    page.reload()
    fill(page, prompt="before the models", width=64, height=64, steps=4)
    page.get_by_role("button", name="Generate").click()
    # Waiting for the models, not sending.
    expect(page.locator("#generate")).to_be_disabled()
    deadline = time.monotonic() + 30
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)  # lets Playwright deliver the held request
    assert held, "the page never asked for the models"
    with page.expect_request(
        lambda req: req.url.endswith("/api/v1/generations") and req.method == "POST"
    ) as sent:
        for route in held:
            route.continue_()
    page.unroute("**/api/v1/models")
    body = sent.value.post_data_json
    assert (body["model"], body["width"], body["height"], body["steps"]) == (
        "tiny",
        64,
        64,
        4,
    )
    run = page.locator(".run").first
    expect(run.locator(".status")).to_have_text("succeeded", timeout=60_000)
    expect(page.locator('[data-error-for="form"]')).to_be_empty()
    expect(page.locator("#width")).to_have_value("64")


def test_a_queued_run_says_when_it_should_be_done(visit: Visit, stack: Stack) -> None:
    page = visit.page
    account(stack, page, premium=True)
    runs = page.locator(".run")
    # A run first: the node learns how fast it is at this size.
    fill(page, prompt="a first lesson", width=64, height=64, steps=60)
    page.get_by_role("button", name="Generate").click()
    expect(runs.first.locator(".status")).to_have_text("succeeded", timeout=60_000)
    # A long run, and one behind it that says when it should be done.
    fill(page, prompt="a long wait", width=128, height=128, steps=150)
    page.get_by_role("button", name="Generate").click()
    long = runs.filter(has_text="a long wait")
    expect(long.locator(".steps")).to_contain_text("left", timeout=30_000)
    fill(page, prompt="behind the wait", width=64, height=64, steps=60)
    page.get_by_role("button", name="Generate").click()
    queued = runs.filter(has_text="behind the wait")
    expect(queued.locator(".run-note")).to_contain_text(
        re.compile(r"In the queue \(position \d+\), done in about \d+ (s|min)")
    )
    shot(page, "eta-queued-run")
    long.get_by_role("button", name="Cancel").click()
    expect(queued.locator(".status")).to_have_text("succeeded", timeout=60_000)


def test_a_validation_error_shows_beside_its_field(visit: Visit, stack: Stack) -> None:
    page = visit.page
    account(stack, page, premium=True)
    fill(page, prompt="a fox", width=100, height=64, steps=4)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator('[data-error-for="width"]')).to_contain_text("multiple of 8")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".run")).to_have_count(0)


def test_a_normal_account_sees_when_it_runs_and_finds_it_in_history(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    account(stack, page, premium=False)
    fill(page, prompt="a slow sunrise", width=64, height=64, steps=4)
    page.get_by_role("button", name="Generate").click()
    run = page.locator(".run").first
    expect(run.locator(".status")).to_have_text("scheduled")
    expect(run.locator(".run-note")).to_contain_text("emailed to you")
    page.get_by_role("link", name="History").click()
    entry = page.locator(".entry").first
    expect(entry.locator(".run-prompt")).to_have_text("a slow sunrise")
    expect(entry.locator(".status")).to_have_text("scheduled")
    entry.get_by_role("button", name="Cancel").click()
    expect(page.locator(".entry").first.locator(".status")).to_have_text("cancelled")


def test_the_account_page_changes_the_name_and_the_address(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    email = account(stack, page, premium=False)
    page.goto("/account")
    expect(page.locator("#profile-email")).to_have_value(email)
    page.get_by_label("Name (optional)").fill("Ada <b>Lovelace</b>")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#profile-notice")).to_have_text("Saved.")
    expect(page.locator("#profile-name")).to_have_value("Ada <b>Lovelace</b>")
    page.get_by_role("textbox", name="Email address").fill("not an address")
    page.get_by_role("button", name="Save").click()
    error = page.locator('#profile-form [data-error-for="email"]')
    expect(error).not_to_be_empty()
    expect(page.locator("#profile-email")).to_have_attribute("aria-invalid", "true")
    moved = f"moved-{uuid.uuid4().hex[:8]}@example.org"
    page.get_by_role("textbox", name="Email address").fill(moved)
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#profile-notice")).to_contain_text(f"link to {moved}")
    expect(error).to_be_empty()
    # Until the link is opened, the account keeps its address.
    expect(page.locator("#profile-email")).to_have_value(email)


def test_a_token_works_with_the_openai_sdk_until_revoked(
    visit: Visit, stack: Stack
) -> None:
    import openai

    page = visit.page
    account(stack, page, premium=True)
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("notebook")
    page.get_by_role("button", name="Create token").click()
    expect(page.locator("#new-secret")).to_have_text(re.compile(r"^sdapi_\S+$"))
    secret = page.locator("#new-secret").inner_text()
    expect(page.locator("#openai-snippet")).to_contain_text(secret)
    expect(page.locator("#token-rows tr", has_text="notebook")).to_have_count(1)

    client = openai.OpenAI(
        api_key=secret, base_url=f"{stack.base_url}/v1", max_retries=0, timeout=60
    )
    images = client.images.generate(
        prompt="a fox", model="tiny", size="64x64", response_format="b64_json"
    )
    assert base64.b64decode(images.data[0].b64_json or "").startswith(b"\x89PNG")

    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke notebook").click()
    expect(page.locator("#token-rows tr", has_text="notebook")).to_have_count(0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a fox", model="tiny", size="64x64")
    client.close()


def test_a_script_in_a_prompt_is_only_text(visit: Visit, stack: Stack) -> None:
    page = visit.page
    hostile = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'
    account(stack, page, premium=True)
    fill(page, prompt=hostile, width=64, height=64, steps=4)
    page.get_by_role("button", name="Generate").click()
    run = page.locator(".run").first
    expect(run.locator(".run-prompt")).to_have_text(hostile)
    expect(run.locator(".status")).to_have_text("succeeded", timeout=60_000)
    page.get_by_role("link", name="History").click()
    entry = page.locator(".entry").first
    expect(entry.locator(".run-prompt")).to_have_text(hostile)
    assert entry.locator(".thumbs img").get_attribute("title") == hostile
    assert page.evaluate("window.pwned") is None


def test_img2img_from_a_result_and_from_a_file(
    visit: Visit, stack: Stack, tmp_path: Path
) -> None:
    from PIL import Image

    page = visit.page
    account(stack, page, premium=True)
    fill(page, prompt="first pass", width=64, height=64, steps=4)
    page.get_by_role("button", name="Generate").click()
    first = page.locator(".run").first
    expect(first.locator(".status")).to_have_text("succeeded", timeout=60_000)
    first.get_by_role("button", name="Use as starting image").click()
    expect(page.locator("#init-note")).to_have_text(re.compile("image 1 of"))
    fill(page, prompt="second pass", strength=0.5)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator(".run")).to_have_count(2)
    second = page.locator(".run").first
    expect(second.locator(".status")).to_have_text("succeeded", timeout=60_000)
    expect(second.locator(".images img")).to_have_count(1)

    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(start)
    page.get_by_role("button", name="No starting image").click()
    page.locator("#init_image").set_input_files(str(start))
    expect(page.locator("#init-note")).to_have_text("Starting from start.png.")
    fill(page, prompt="from a file")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator(".run")).to_have_count(3)
    third = page.locator(".run").first
    expect(third.locator(".status")).to_have_text("succeeded", timeout=60_000)


def test_a_lost_websocket_reconnects_and_the_run_finishes(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    account(stack, page, premium=True)
    fill(page, prompt="through a restart", width=128, height=128, steps=150)
    page.get_by_role("button", name="Generate").click()
    run = page.locator(".run").first
    expect(run.locator(".steps")).to_have_text(re.compile(r"Step \d+ of 150"))
    web = stack.services["web"]
    web.kill()  # the socket drops with it
    expect(run.locator(".run-note")).to_have_text("Connection lost; reconnecting…")
    web.start()
    # The page reconnects, subscribes again, and the replay brings the rest.
    expect(run.locator(".status")).to_have_text("succeeded", timeout=90_000)
    expect(run.locator(".images img")).to_have_count(1)


def test_the_playground_fits_a_phone_and_works_by_keyboard(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    account(stack, page, premium=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()
    # Nothing wider than the screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # Keyboard only: type a prompt, then press Enter on the button.
    page.locator("#prompt").focus()
    page.keyboard.type("keyboard only")
    fill(page, width=64, height=64, steps=4)
    page.locator("#generate").focus()
    page.keyboard.press("Enter")
    run = page.locator(".run").first
    expect(run.locator(".status")).to_have_text("succeeded", timeout=60_000)
    expect(run.locator(".images img")).to_have_attribute(
        "alt", re.compile("keyboard only")
    )


def shot(page: Page, name: str) -> None:
    """A screenshot for a person to look at, beside the fixture's last one."""
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_model_picker_shows_each_models_state_and_follows_the_node(
    visit: Visit, stack: Stack
) -> None:
    page = visit.page
    account(stack, page, premium=True)
    options = page.locator("#model option")
    expect(options).to_have_text(
        [
            "other — loads on first use",
            "spare — waiting for a GPU node",
            "tiny — ready",
        ]
    )
    # The page starts on a model that needs no wait.
    expect(page.locator("#model")).to_have_value("tiny")
    note = page.locator("#model-note")
    expect(note).to_have_text(re.compile(r"^Ready on 1 GPU node\."))
    page.locator("#model").select_option("other")
    expect(note).to_contain_text("first image waits while the model loads")
    page.locator("#model").select_option("spare")
    expect(note).to_contain_text("No GPU node serves this model")
    page.locator("#model").select_option("tiny")
    shot(page, "model-picker-states")

    # The node goes: the picker says so within a poll, and a run queued
    # meanwhile says it waits for a node...
    node = stack.services["gpu-node"]
    node.stop()
    try:
        expect(options.last).to_have_text(
            "tiny — waiting for a GPU node", timeout=30_000
        )
        expect(note).to_contain_text("No GPU node serves this model")
        fill(page, prompt="while no node is up", width=64, height=64, steps=4)
        page.get_by_role("button", name="Generate").click()
        run = page.locator(".run").first
        expect(run.locator(".run-note")).to_contain_text("Waiting for a GPU node")
        shot(page, "model-picker-no-node")
    finally:
        node.start()
    # ...and once it is back, the run finishes with no stale notice, and the
    # picker says the model is ready again.
    expect(run.locator(".status")).to_have_text("succeeded", timeout=90_000)
    expect(run.locator(".run-note")).to_be_empty()
    expect(options.last).to_have_text("tiny — ready", timeout=30_000)
    expect(note).to_have_text(re.compile(r"^Ready on 1 GPU node\."))


def test_a_lora_chosen_in_the_picker_reaches_the_request_and_the_image(
    visit: Visit, stack: Stack
) -> None:
    from PIL import Image

    page = visit.page
    account(stack, page, premium=True)
    expect(page.locator("#lora-choice option")).to_have_text([LORA])
    page.get_by_role("button", name="Add LoRA").click()
    row = page.locator("#lora-list .lora")
    expect(row).to_have_count(1)
    expect(row.locator(".lora-name")).to_have_text(LORA)
    expect(row.locator(".lora-triggers")).to_have_text("Trigger words: red fox, autumn")
    weight = page.get_by_label(f"Weight of {LORA}")
    expect(weight).to_have_value("1")
    expect(weight).to_be_focused()
    weight.fill("0.8")
    # Its one LoRA is taken: nothing more to add.
    expect(page.get_by_role("button", name="Add LoRA")).to_be_disabled()
    fill(page, prompt="a red fox", width=64, height=64, steps=4)
    shot(page, "lora-picker-chosen")
    with page.expect_request(
        lambda req: req.url.endswith("/api/v1/generations") and req.method == "POST"
    ) as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["loras"] == [{"name": LORA, "weight": 0.8}]
    run = page.locator(".run").first
    expect(run.locator(".status")).to_have_text("succeeded", timeout=60_000)
    expect(run.locator(".run-meta")).to_contain_text(f"LoRA {LORA} 0.8")
    href = run.get_by_role("link", name="Download").get_attribute("href")
    png = page.request.get(href)
    assert png.ok
    with Image.open(io.BytesIO(png.body())) as image:
        parameters = image.info["parameters"]
    assert f"<lora:{LORA}:0.8>" in parameters
    assert "Lora hashes:" in parameters

    # Removed by keyboard, then "Use these settings again" brings it back.
    page.get_by_role("button", name=f"Remove {LORA}").press("Enter")
    expect(row).to_have_count(0)
    expect(page.get_by_role("button", name="Add LoRA")).to_be_enabled()
    run.get_by_role("button", name="Use these settings again").click()
    expect(row).to_have_count(1)
    expect(page.get_by_label(f"Weight of {LORA}")).to_have_value("0.8")
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "lora-picker-phone")
