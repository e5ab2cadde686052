"""The emails of finished generations: plain text and HTML, with signed links."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from gpu_node.schemas import GenerationResult, Status
from web.links import signed_image_url
from web.models import Generation


@dataclass(frozen=True)
class Message:
    subject: str
    text: str
    html: str


def _short(prompt: str, limit: int = 60) -> str:
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


def generation_email(
    generation: Generation, result: GenerationResult, *, secret: str, base_url: str
) -> Message:
    """The email for a generation that succeeded or failed (PNGs attached later)."""
    prompt = str(generation.request.get("prompt", ""))
    if result.status is Status.FAILED:
        reason = result.error.message if result.error else "unknown reason"
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
        for image in result.images
    ]
    count = len(links)
    noun = "image is" if count == 1 else f"{count} images are"
    lines = "\n".join(f"  #{index} (seed {seed}): {url}" for index, seed, url in links)
    text = (
        f"Your {noun} ready and attached to this email.\n\n"
        f"Prompt: {prompt}\n"
        f"Size: {generation.width}x{generation.height}, {generation.steps} steps, "
        f"guidance {generation.guidance_scale}, scheduler {generation.scheduler}\n\n"
        f"Download links (valid for 30 days):\n{lines}\n\n"
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
        f"<p>Download links (valid for 30 days):</p><ul>{items}</ul>"
        f"<p style='color:#666'>Request id: {generation.id}</p>"
    )
    return Message(f"Your image is ready: {_short(prompt)}", text, html)
