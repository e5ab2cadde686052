"""Writing emails to the outbox; the jobs worker sends them."""

from __future__ import annotations

from collections.abc import Mapping

import jinja2

from sdapi.db.models import Generation, OutboxEmail


async def queue_email(
    *,
    dedupe_key: str,
    to_address: str,
    subject: str,
    text_body: str,
    html_body: str | None = None,
    generation: Generation | None = None,
) -> None:
    """Add an email to the outbox unless one with `dedupe_key` is already there.

    Call it inside the transaction that makes the email true (a user created,
    a result stored), so the email exists exactly when that change does.
    ON CONFLICT DO NOTHING keeps a concurrent duplicate from aborting it.
    """
    email = OutboxEmail(
        dedupe_key=dedupe_key,
        to_address=to_address,
        subject=subject,
        text_body=text_body,
        html_body=html_body,
        generation=generation,
    )
    await OutboxEmail.bulk_create([email], ignore_conflicts=True)


def render_email(
    templates: jinja2.Environment, name: str, context: Mapping[str, object]
) -> tuple[str, str]:
    """The text and HTML bodies of the email `name` (`email/<name>.txt|.html`)."""
    text = templates.get_template(f"email/{name}.txt").render(context)
    html = templates.get_template(f"email/{name}.html").render(context)
    return text, html


def mail_templates() -> jinja2.Environment:
    """The email templates (`sdapi/db/templates/email`); HTML ones are escaped."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("sdapi.db", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
