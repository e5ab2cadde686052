"""The emails of finished generations: plain text and HTML, with signed links."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from jobs.resources import JobsResources
from sdapi.contract.payloads import ErrorInfo, GenerationResult
from sdapi.contract.status import Status
from sdapi.db.models import Delivery, Generation
from sdapi.db.outbox import queue_email, render_email
from sdapi.infra.links import LINK_TTL_S, signed_image_url

# What a download link's lifetime reads as in an email.
LINK_VALIDITY = (
    f"{LINK_TTL_S // 86400} days"
    if LINK_TTL_S % 86400 == 0
    else f"{LINK_TTL_S // 3600} hours"
)


@dataclass(frozen=True)
class Message:
    subject: str
    text: str
    html: str


def _short(prompt: str, limit: int = 60) -> str:
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def generation_email(
    templates: jinja2.Environment,
    generation: Generation,
    outcome: GenerationResult | ErrorInfo,
    *,
    secret: str,
    base_url: str,
) -> Message:
    """The email for a generation that succeeded or failed (PNGs attached later).

    `outcome` is the node's result, or the error a generation failed with
    before any node returned one.
    """
    request = generation.request if isinstance(generation.request, dict) else {}
    prompt = str(request.get("prompt", ""))
    if isinstance(outcome, GenerationResult) and outcome.status is Status.FAILED:
        outcome = outcome.error or ErrorInfo(code="failed", message="unknown reason")
    if isinstance(outcome, ErrorInfo):
        context = {"prompt": prompt, "reason": outcome.message, "id": generation.id}
        return Message(
            f"Your image failed: {_short(prompt)}",
            *render_email(templates, "generation_failed", context),
        )
    links = [
        {
            "index": image.index,
            "seed": image.seed,
            "url": signed_image_url(secret, base_url, generation.id, image.index),
        }
        for image in outcome.images
    ]
    context = {
        "noun": "image is" if len(links) == 1 else f"{len(links)} images are",
        "prompt": prompt,
        "width": generation.width,
        "height": generation.height,
        "steps": generation.steps,
        "guidance": generation.guidance_scale,
        "scheduler": generation.scheduler,
        "validity": LINK_VALIDITY,
        "links": links,
        "id": generation.id,
    }
    return Message(
        f"Your image is ready: {_short(prompt)}",
        *render_email(templates, "generation_ready", context),
    )


async def queue_generation_email(
    resources: JobsResources,
    generation: Generation,
    outcome: GenerationResult | ErrorInfo,
) -> bool:
    """Write the email of a finished generation to the outbox, once.

    Only for email delivery, and for success or failure (a cancelled request
    gets none). Call it inside the transaction that makes the outcome final;
    the dedupe key makes a second call (a repeated result, the reconciler)
    change nothing. True if the generation's delivery is email.
    """
    if generation.delivery is not Delivery.EMAIL:
        return False
    if isinstance(outcome, GenerationResult) and outcome.status not in (
        Status.SUCCEEDED,
        Status.FAILED,
    ):
        return False
    await generation.fetch_related("user")
    message = generation_email(
        resources.templates,
        generation,
        outcome,
        secret=resources.settings.secret(),
        base_url=resources.settings.public_url,
    )
    await queue_email(
        dedupe_key=f"generation:{generation.id}",
        to_address=generation.user.email,
        subject=message.subject,
        text_body=message.text,
        html_body=message.html,
        generation=generation,
    )
    return True
