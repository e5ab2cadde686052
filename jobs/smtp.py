"""Turning outbox rows into MIME messages, and handing them to an SMTP server.

Building a message with attachments (base64 of several PNGs) and flattening
it to bytes happen in a worker thread; only the SMTP conversation runs on the
event loop.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from enum import Enum
from types import TracebackType
from uuid import UUID

import aiosmtplib

from jobs.settings import SmtpConfig
from sdapi.db.image_store import ImageStores
from sdapi.db.models import GeneratedImage, OutboxEmail


@dataclass(frozen=True)
class Attachment:
    filename: str
    maintype: str
    subtype: str
    data: bytes


@dataclass(frozen=True)
class OutgoingMail:
    """A message ready for SMTP: envelope addresses and the flattened bytes."""

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str
    # Non-ASCII addresses need the server's SMTPUTF8 extension.
    smtputf8: bool = False
    attachments: list[str] = field(default_factory=list)


def message_id(outbox_id: UUID | str, mail_from: str) -> str:
    """The Message-ID of an outbox row: the same on every attempt, so a
    receiver can recognise a repeat."""
    domain = email.utils.parseaddr(mail_from)[1].rpartition("@")[2] or "sdapi.local"
    return f"<outbox.{outbox_id}@{domain}>"


# SMTP's limit on a line, in bytes, line ending excluded (RFC 5321).
SMTP_LINE_MAX = 998


def _plain_cte(text: str) -> str | None:
    """7bit for ASCII text that fits SMTP's lines, so links stay whole in the raw
    message (quoted-printable would fold them); None lets email pick one."""
    fits = all(len(line) <= SMTP_LINE_MAX for line in text.splitlines())
    return "7bit" if text.isascii() and fits else None


def build_message(
    *,
    mail_from: str,
    to_address: str,
    subject: str,
    text_body: str,
    html_body: str | None,
    msg_id: str,
    date: datetime,
    attachments: list[Attachment],
) -> EmailMessage:
    """A text (+ HTML alternative) message with its attachments."""
    message = EmailMessage()
    message["From"] = mail_from
    message["To"] = to_address
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(date)
    message["Message-ID"] = msg_id
    # Tells mail servers and clients not to auto-reply (RFC 3834).
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text_body, cte=_plain_cte(text_body))
    if html_body:
        message.add_alternative(html_body, subtype="html", cte=_plain_cte(html_body))
    for attachment in attachments:
        message.add_attachment(
            attachment.data,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
        )
    return message


def _needs_smtputf8(*addresses: str) -> bool:
    return not all(address.isascii() for address in addresses)


def _render(
    row: OutboxEmail, mail_from: str, attachments: list[Attachment]
) -> OutgoingMail:
    msg_id = message_id(row.id, mail_from)
    message = build_message(
        mail_from=mail_from,
        to_address=row.to_address,
        subject=row.subject,
        text_body=row.text_body,
        html_body=row.html_body,
        msg_id=msg_id,
        # The time the email was written, whichever attempt delivers it.
        date=row.created_at,
        attachments=attachments,
    )
    sender = email.utils.parseaddr(mail_from)[1]
    smtputf8 = _needs_smtputf8(sender, row.to_address)
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    return OutgoingMail(
        sender=sender,
        recipients=[row.to_address],
        data=message.as_bytes(policy=policy),
        message_id=msg_id,
        smtputf8=smtputf8,
        attachments=[attachment.filename for attachment in attachments],
    )


async def _attachments(row: OutboxEmail, stores: ImageStores) -> list[Attachment]:
    generation_id = row.generation_id  # type: ignore[attr-defined]
    if generation_id is None:
        return []
    images = await GeneratedImage.filter(generation_id=generation_id).order_by("index")
    pngs = await stores.read_all((image.store, image.object_key) for image in images)
    return [
        Attachment(
            filename=f"sdapi-{generation_id}-{image.index}.png",
            maintype="image",
            subtype="png",
            data=png,
        )
        for image, png in zip(images, pngs, strict=True)
    ]


async def compose(
    row: OutboxEmail, *, mail_from: str, stores: ImageStores
) -> OutgoingMail:
    """The outgoing mail for an outbox row, its generation's PNGs attached
    (StoreUnavailable while their store is down)."""
    attachments = await _attachments(row, stores)
    return await asyncio.to_thread(_render, row, mail_from, attachments)


class Trouble(Enum):
    """Whom an SMTP failure is about, which decides what the outbox does."""

    # The server is down, slow, or refuses us (connect, TLS, login, our sender
    # address, a 4xx to the session, a dropped connection): no message can go
    # now, and none is to blame.
    SERVER = "server"
    # A 4xx about this message's recipient (greylisting, a full mailbox):
    # this message waits; the others go on.
    TEMPORARY = "temporary"
    # A 5xx about this message's recipient or content, or a feature it needs
    # that the server lacks: it can never be delivered.
    PERMANENT = "permanent"


class SendFailed(Exception):
    """An SMTP delivery failed; `trouble` says whom it is about."""

    def __init__(self, trouble: Trouble, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.trouble = trouble


def _is_5xx(code: int) -> bool:
    return 500 <= code < 600


def classify(exc: BaseException) -> Trouble:
    """Whom an error raised while sending one message (after connecting) is about."""
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # SMTPUTF8 for a non-ASCII address: this message, on this server.
        return Trouble.PERMANENT
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        permanent = all(_is_5xx(refused.code) for refused in exc.recipients)
        return Trouble.PERMANENT if permanent else Trouble.TEMPORARY
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
        return Trouble.PERMANENT if _is_5xx(exc.code) else Trouble.TEMPORARY
    if isinstance(exc, aiosmtplib.SMTPDataError) and _is_5xx(exc.code):
        return Trouble.PERMANENT
    return Trouble.SERVER


class SmtpConnection:
    """One SMTP session for a round of messages; reconnects after a broken one."""

    def __init__(self, config: SmtpConfig, *, timeout: float) -> None:
        self._config = config
        self._timeout = timeout
        self._smtp: aiosmtplib.SMTP | None = None

    async def __aenter__(self) -> SmtpConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        config = self._config
        smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username,
            password=config.password,
            use_tls=config.use_tls,
            start_tls=config.start_tls,
            timeout=self._timeout,
        )
        # Logs in when a username is set, after STARTTLS when asked for.
        try:
            await smtp.connect()
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise SendFailed(Trouble.SERVER, exc) from exc
        self._smtp = smtp
        return smtp

    async def send(self, mail: OutgoingMail) -> None:
        """Deliver `mail`; raises SendFailed saying whom a failure is about."""
        smtp = await self._connected()
        try:
            await smtp.sendmail(
                mail.sender,
                mail.recipients,
                mail.data,
                mail_options=["SMTPUTF8"] if mail.smtputf8 else None,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            trouble = classify(exc)
            if trouble is Trouble.SERVER:
                self.abort()
            raise SendFailed(trouble, exc) from exc

    def abort(self) -> None:
        """Drop the connection without a goodbye (the server is not answering)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    async def close(self) -> None:
        """Say goodbye politely; drop the connection either way."""
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
