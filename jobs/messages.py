"""The emails of finished generations: plain text and HTML, with signed links."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from gpu_node.schemas import ErrorInfo, GenerationResult, Status
from jobs.worker import JobsResources
from web.links import LINK_TTL_S, signed_image_url
from web.models import Delivery, Generation
from web.outbox import queue_email

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
        reason = outcome.message
        text = (
            f"Your image request could not be completed.\n\n"
            f"Prompt: {prompt}\nReason: {reason}\n\n"
            f"Request id: {generation.id}\n"
        )
        html = (
            f"<p>Your image request could not be completed.</p>"
            f"<p><b>Prompt:</b> {escape(prompt)}<br><b>Reason:</b> {escape(reason)}</p>"
            f"<p style='color:#666'>Request id: {generation.id}</p>"
        )
        return Message(f"Your image failed: {_short(prompt)}", text, html)

    links = [
        (
            image.index,
            image.seed,
            signed_image_url(secret, base_url, generation.id, image.index),
        )
        for image in outcome.images
    ]
    count = len(links)
    noun = "image is" if count == 1 else f"{count} images are"
    lines = "\n".join(f"  #{index} (seed {seed}): {url}" for index, seed, url in links)
    text = (
        f"Your {noun} ready and attached to this email.\n\n"
        f"Prompt: {prompt}\n"
        f"Size: {generation.width}x{generation.height}, {generation.steps} steps, "
        f"guidance {generation.guidance_scale}, scheduler {generation.scheduler}\n\n"
        f"Download links (valid for {LINK_VALIDITY}):\n{lines}\n\n"
        f"Request id: {generation.id}\n"
    )
    items = "".join(
        f"<li><a href='{escape(url)}'>Image #{index}</a> (seed {seed})</li>"
        for index, seed, url in links
    )
    html = (
        f"<p>Your {noun} ready and attached to this email.</p>"
        f"<p><b>Prompt:</b> {escape(prompt)}<br>"
        f"{generation.width}x{generation.height}, {generation.steps} steps, "
        f"guidance {generation.guidance_scale}, "
        f"scheduler {escape(generation.scheduler)}</p>"
        f"<p>Download links (valid for {LINK_VALIDITY}):</p><ul>{items}</ul>"
        f"<p style='color:#666'>Request id: {generation.id}</p>"
    )
    return Message(f"Your image is ready: {_short(prompt)}", text, html)


async def queue_generation_email(
    res: JobsResources, generation: Generation, outcome: GenerationResult | ErrorInfo
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
        generation,
        outcome,
        secret=res.settings.secret(),
        base_url=res.settings.public_url,
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
