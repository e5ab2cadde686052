"""What the jobs worker holds while it runs, on arq's ctx as one typed object."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import jinja2

from jobs.settings import JobsSettings
from sdapi.db.image_store import ImageStores
from sdapi.db.outbox import mail_templates
from sdapi.db.webhooks import LinkSigner
from sdapi.infra.queue import QueuePool
from sdapi.infra.registry import NodeRegistry

RESOURCES = "sdapi"  # the key of `JobsResources` on arq's ctx
# The webhook sender's periodic task; `JobsResources.wake(WEBHOOKS_TASK)`
# runs it at once (an event was just written).
WEBHOOKS_TASK = "webhooks"


@dataclass
class SmtpBackoff:
    """This process's view of an SMTP server that is down: when to try it again."""

    failures: int = 0  # server-level failures in a row
    retry_at: float = 0.0  # time.monotonic() before which no round tries it


@dataclass
class JobsResources:
    """What the jobs worker holds while it runs."""

    settings: JobsSettings
    redis: QueuePool
    registry: NodeRegistry
    stack: contextlib.AsyncExitStack
    # Where image bytes are written and read (closed by `stack`).
    stores: ImageStores
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    smtp_backoff: SmtpBackoff = field(default_factory=SmtpBackoff)
    templates: jinja2.Environment = field(default_factory=mail_templates)
    # Periodic tasks run early when woken (`wake`), by name.
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)

    def wakeup(self, task: str) -> asyncio.Event:
        """The event that runs periodic task `task` early."""
        return self.wakeups.setdefault(task, asyncio.Event())

    def wake(self, task: str) -> None:
        """Run periodic task `task` now rather than at its next interval."""
        self.wakeup(task).set()

    def links(self) -> LinkSigner:
        """What signs the image URLs of webhook payloads."""
        return LinkSigner(self.settings.secret(), self.settings.public_url)


def resources_of(ctx: dict[str, Any]) -> JobsResources:
    """The typed resources on an arq ctx."""
    found: JobsResources = ctx[RESOURCES]
    return found
