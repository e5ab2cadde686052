"""Writing emails to the outbox; the jobs worker sends them."""

from __future__ import annotations

from web.models import Generation, OutboxEmail


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
