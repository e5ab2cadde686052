"""Settings of the jobs worker, built once in `jobs.main` and passed down."""

from __future__ import annotations

from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from sdapi.infra.settings import CommonSettings, SettingsError, http_url


class SmtpConfig(BaseModel):
    """Where mail goes, parsed from smtp://[user:pass@]host:port[?starttls=true]."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    use_tls: bool = False  # implicit TLS (smtps://)
    start_tls: bool = False


def parse_smtp_url(url: str) -> SmtpConfig:
    """Parse an smtp:// or smtps:// URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"smtp", "smtps"} or not parts.hostname:
        raise ValueError("must be smtp://[user:pass@]host:port[?starttls=true]")
    query = parse_qs(parts.query)
    start_tls = query.get("starttls", ["false"])[0].lower() in {"1", "true", "yes"}
    if start_tls and parts.scheme == "smtps":
        raise ValueError(
            "starttls=true goes with smtp://; smtps:// is TLS from the start"
        )
    return SmtpConfig(
        host=parts.hostname,
        port=parts.port or (465 if parts.scheme == "smtps" else 25),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        use_tls=parts.scheme == "smtps",
        start_tls=start_tls,
    )


class JobsSettings(CommonSettings):
    # Unset under `sdapi dev`: a local sink that keeps mail as .eml files.
    # Required when SDAPI_DATABASE_URL is set (mail would wait forever).
    smtp_url: str | None = None
    mail_from: str = "sdapi <sdapi@localhost>"
    public_url: str = "http://127.0.0.1:8080"
    # How often the periodic tasks run, in seconds.
    dispatch_interval: float = Field(default=1.0, gt=0)
    reconcile_interval: float = Field(default=10.0, gt=0)
    outbox_interval: float = Field(default=1.0, gt=0)
    # Expired idempotency keys and unused input images go this often.
    cleanup_interval: float = Field(default=600.0, gt=0)
    # Batches kept on a model's batch queue (waiting or running) per healthy
    # node; beyond that due rows wait in the database, which stays the buffer.
    dispatch_batches_per_node: int = Field(default=2, ge=1)
    # How long a batch that is not full may wait for more rows after its
    # oldest row became due (seconds; 0: dispatch whatever is due). Requests
    # sent in one burst become due together and share a batch; full batches
    # never wait.
    dispatch_window: float = Field(default=2.0, ge=0)
    # Most due rows one dispatch round looks at per model.
    dispatch_scan_limit: int = Field(default=500, ge=1)
    # Enqueues of one generation (first run included) before it ends `failed`.
    generation_max_attempts: int = Field(default=3, ge=1)
    # Stuck rows one reconcile round handles, oldest deadline first.
    reconcile_batch_limit: int = Field(default=200, ge=1)
    # Rounds in a row that may fail on the same job (a bug, bad data) before
    # its rows end `failed` (internal_error) instead of being tried forever.
    reconcile_max_failures: int = Field(default=5, ge=1)
    # Work nobody runs ends `failed` (model_unavailable) after this long, in
    # seconds: a premium request this long after it was made and still
    # waiting for a node; a normal batch waiting this long on its queue; a
    # normal request this long past its scheduled time and still not
    # dispatched (no node serves its model).
    premium_max_queued: float = Field(default=15 * 60.0, gt=0)
    batch_max_queued: float = Field(default=6 * 3600.0, gt=0)
    scheduled_max_wait: float = Field(default=24 * 3600.0, gt=0)
    # Outbox. A message-level failure (bad data, a sender that died while
    # sending) counts an attempt, retried with exponential backoff from base to
    # max seconds, up to max attempts; a 5xx about the recipient or content
    # fails at once. Server-level trouble (down, slow, authentication, 4xx)
    # counts no attempt: the round ends, the server is tried again with the
    # same backoff, and an email still unsent this long after it was written
    # (seconds) ends `failed`.
    outbox_max_attempts: int = Field(default=12, ge=1)
    outbox_backoff_base: float = Field(default=2.0, gt=0)
    outbox_backoff_max: float = Field(default=600.0, gt=0)
    outbox_give_up_after: float = Field(default=3 * 24 * 3600.0, gt=0)
    # A message claimed but not sent after this long is retried (sender died).
    outbox_stuck_after: float = Field(default=300.0, gt=0)
    # Longest one delivery (building and sending a message) may take; under
    # half of outbox_stuck_after, so a slow send is never taken over while it
    # still runs (seconds).
    outbox_send_timeout: float = Field(default=120.0, gt=0)
    # Per SMTP command (connect, each reply), seconds.
    smtp_timeout: float = Field(default=30.0, gt=0)
    # Longest wait between tries of an SMTP server that is down (seconds);
    # the waits grow from outbox_backoff_base.
    smtp_retry_max: float = Field(default=60.0, gt=0)
    # Webhooks (jobs/webhook_sender.py). The sender runs this often, and at
    # once when this process records an event. A POST not answered 2xx within
    # webhook_timeout (seconds) is retried with exponential backoff from base
    # to max seconds, until webhook_give_up_after after the event.
    webhook_interval: float = Field(default=1.0, gt=0)
    # A delivery claimed this long ago and not finished is retried (its
    # sender died); over twice webhook_timeout.
    webhook_stuck_after: float = Field(default=60.0, gt=0)
    webhook_timeout: float = Field(default=10.0, gt=0)
    webhook_backoff_base: float = Field(default=5.0, gt=0)
    webhook_backoff_max: float = Field(default=3600.0, gt=0)
    webhook_give_up_after: float = Field(default=24 * 3600.0, gt=0)
    # POSTs in flight at once per sender.
    webhook_concurrency: int = Field(default=16, ge=1)
    # Objects queued for deletion (jobs/storage_deleter.py) go this often; a
    # store that fails is tried again with exponential backoff from base to
    # max seconds, for as long as it fails (no object is ever given up on).
    storage_deletion_interval: float = Field(default=10.0, gt=0)
    storage_deletion_backoff_base: float = Field(default=5.0, gt=0)
    storage_deletion_backoff_max: float = Field(default=900.0, gt=0)
    # Send to loopback, private, link-local and metadata addresses too (only
    # where every receiver is trusted, e.g. development).
    webhook_allow_private: bool = False

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parse_smtp_url(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("outbox_send_timeout")
    @classmethod
    def _send_timeout(cls, value: float, info: ValidationInfo) -> float:
        stuck_after = info.data.get("outbox_stuck_after")
        if stuck_after is not None and value >= stuck_after / 2:
            raise ValueError(
                "must be under half of SDAPI_OUTBOX_STUCK_AFTER (a slow send "
                "would be taken over while it runs)"
            )
        return value

    @field_validator("webhook_timeout")
    @classmethod
    def _webhook_timeout(cls, value: float, info: ValidationInfo) -> float:
        stuck_after = info.data.get("webhook_stuck_after")
        if stuck_after is not None and value >= stuck_after / 2:
            raise ValueError(
                "must be under half of SDAPI_WEBHOOK_STUCK_AFTER (a slow POST "
                "would be taken over while it runs)"
            )
        return value

    @property
    def smtp(self) -> SmtpConfig | None:
        return parse_smtp_url(self.smtp_url) if self.smtp_url else None

    def resolved(self) -> Self:
        """As CommonSettings.resolved, and a deployment must name its SMTP server."""
        if self.database_url and not self.smtp_url:
            raise SettingsError(
                "SDAPI_SMTP_URL must be set when SDAPI_DATABASE_URL is: without it "
                "emails wait in the outbox forever"
            )
        resolved = super().resolved()
        if resolved.smtp_url:
            smtp_url = resolved.via_consul(resolved.smtp_url, "SDAPI_SMTP_URL")
            resolved = resolved.model_copy(update={"smtp_url": smtp_url})
        return resolved
