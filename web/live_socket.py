"""The live WebSocket: one reader loop per socket, relays, limits, revocation.

Each WebSocket has one reader loop (`LiveSocket.serve`), which also re-checks
the socket's credentials every `ws_recheck_s`, and one relay task per
followed generation; every write goes through the socket's lock, and a
failed write only ends that socket's relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from sdapi.contract.names import REVOKED_TOKENS_CHANNEL, USERS_CHANGED_CHANNEL
from sdapi.contract.status import Status, Tier
from sdapi.infra.deadline import Deadline
from sdapi.infra.pubsub import Listener
from web.appkeys import redis_key, settings_key
from web.auth import Principal
from web.errors import (
    DEPENDENCY_ERRORS,
    AppError,
    Conflict,
    PremiumRequired,
    RateLimited,
    Unauthorized,
    dependency_unavailable,
    validation_details,
)
from web.generation_views import (
    error_ref,
    present,
)
from web.generations import (
    CallerChanged,
    cancel_generation,
    load_own,
    prepare_inputs,
    submit_and_place,
)
from web.live import (
    SOCKET_RETRY_S,
    done_frame,
    event_frame,
    feeds_key,
    follow,
)
from web.request_resolution import request_sources
from web.schemas.live import (
    CLIENT_MESSAGE,
    MESSAGE_TYPES,
    AcceptedFrame,
    CancelMessage,
    ErrorFrame,
    FieldProblem,
    GenerateMessage,
)
from web.token_cache import new_token_cache
from web.tokens import find_token_by_id

log = logging.getLogger(__name__)


class LiveWebSocket(web.WebSocketResponse):
    """A WebSocketResponse that owns a write lock and explains an oversize close.

    aiohttp closes the connection itself when a message exceeds max_msg_size
    (code 1009, no reason); this adds an error frame and a close reason, so
    the client learns why.
    """

    def __init__(self, *, max_msg_size: int, heartbeat: float) -> None:
        # No permessage-deflate: frames are small JSON or base64 PNG/JPEG, which
        # barely compress, and compressing them costs latency.
        super().__init__(max_msg_size=max_msg_size, heartbeat=heartbeat, compress=False)
        self.limit = max_msg_size
        self.send_lock = asyncio.Lock()

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        """Close; an oversize message gets an error frame and a reason first."""
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message and not self.closed:
            text = f"Message too big: at most {self.limit} bytes."
            frame = ErrorFrame(id=None, code="payload_too_large", message=text)
            async with self.send_lock:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.send_str(frame.model_dump_json())
            message = text.encode()
        return await super().close(code=code, message=message, drain=drain)


class CredentialsRevoked(Unauthorized):
    """The socket's token was revoked or expired while it was open."""


# Most generations a socket remembers having followed (ids, a few KB).
MAX_FOLLOWED = 4096


class MessageAllowance:
    """A token bucket: `rate` messages a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None
        self._said_at = -1e9

    def take(self, now: float) -> bool:
        """Whether one more message may be handled now."""
        if self._at is not None:
            self._tokens = min(
                self._burst, self._tokens + (now - self._at) * self._rate
            )
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def should_say_so(self, now: float) -> bool:
        """One `rate_limited` frame a second at most: refusals must not flood."""
        if now - self._said_at < 1:
            return False
        self._said_at = now
        return True


UNSENDABLE = "An answer to your message could not be sent; check its text."
# Longest client id an error frame quotes back (the contract's own limit).
ECHOED_ID_MAX = 100


def sendable(text: str) -> str:
    """`text` as JSON can carry it: lone surrogates become `\\udXXX` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def echoable_id(value: object) -> str | None:
    """The client's `id`, when an error frame may quote it back: a short string
    that is valid Unicode (a lone surrogate cannot be sent as JSON)."""
    if not isinstance(value, str) or len(value) > ECHOED_ID_MAX:
        return None
    return value if sendable(value) == value else None


# Message types after which a socket reads nothing more.
_CLOSED = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})


class LiveSocket:
    """One client's WebSocket: its reader loop, serialized writes and relays."""

    def __init__(
        self, app: web.Application, ws: LiveWebSocket, principal: Principal
    ) -> None:
        self._app = app
        self._ws = ws
        self._principal = principal
        self._relays: dict[str, asyncio.Task[None]] = {}
        # Every generation this socket was told about: a second subscribe
        # would send it all again (an image is megabytes), so it is refused.
        self._followed: set[str] = set()
        settings = app[settings_key]
        self._allowance = MessageAllowance(
            settings.ws_messages_per_s, settings.ws_message_burst
        )

    async def send(self, frame: BaseModel) -> bool:
        """Write one frame; False once the client is gone (the error is swallowed)."""
        try:
            text = frame.model_dump_json()
        except PydanticSerializationError:
            # Text the client sent can hold what JSON cannot carry (a lone
            # surrogate); echoing it is a bug, but it must not end the socket.
            log.warning(
                "live socket: a %s could not be serialised", type(frame).__name__
            )
            text = ErrorFrame(
                id=None, code="internal_error", message=UNSENDABLE
            ).model_dump_json()
        async with self._ws.send_lock:
            if self._ws.closed:
                return False
            try:
                await self._ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return False
        return True

    async def serve(self) -> None:
        """Read messages until the client goes; then stop this socket's relays.

        Between messages the loop wakes every `ws_recheck_s` to re-check the
        credentials, so a revoked or expired token ends the socket even while
        it only streams.
        """
        loop = asyncio.get_running_loop()
        every = self._app[settings_key].ws_recheck_s
        recheck_at = loop.time() + every
        try:
            while not self._ws.closed:
                if loop.time() >= recheck_at:
                    recheck_at = loop.time() + every
                    if not await self._still_allowed():
                        break
                try:
                    # Never 0: aiohttp reads 0 as "no timeout".
                    wait = max(recheck_at - loop.time(), 0.001)
                    message = await self._ws.receive(timeout=wait)
                except TimeoutError:
                    continue
                if message.type in _CLOSED:
                    break
                if message.type is WSMsgType.TEXT:
                    if self._allowance.take(loop.time()):
                        await self._handle(message.data)
                    elif self._allowance.should_say_so(loop.time()):
                        await self._error(
                            None,
                            "rate_limited",
                            "Too many messages on this socket; some were dropped. "
                            "Slow down.",
                        )
                elif message.type is WSMsgType.BINARY:
                    await self._error(None, "bad_request", "Send JSON text frames.")
                # ERROR: aiohttp has already closed the socket (LiveWebSocket.close).
        finally:
            await self.stop()

    async def _still_allowed(self) -> bool:
        """Re-check the credentials; False once the socket was closed for them."""
        try:
            await self._current_principal()
        except CredentialsRevoked as exc:
            await self._error(None, exc.code, exc.message)
            await self.close(WSCloseCode.POLICY_VIOLATION, "credentials revoked")
            return False
        except DEPENDENCY_ERRORS:
            # Checked again at the next interval, and at every message.
            log.warning("live socket: credentials not re-checked", exc_info=True)
        return True

    def uses_token(self, token_id: str) -> bool:
        return str(self._principal.token.id) == token_id

    async def revoke(self) -> None:
        """Its token was revoked: say so and close, from outside the reader loop."""
        await self._error(
            None, "unauthorized", "Your token was revoked; sign in again."
        )
        await self.close(WSCloseCode.POLICY_VIOLATION, "credentials revoked")

    async def close(self, code: int, reason: str) -> None:
        """Close the socket from outside the reader loop (server shutdown)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._ws.close(code=code, message=reason.encode())

    async def stop(self) -> None:
        """Cancel the relays; the generations themselves go on."""
        relays = list(self._relays.values())
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _error(
        self,
        ident: str | None,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        problems = [
            FieldProblem(field=sendable(d["field"]), message=sendable(d["message"]))
            for d in details or []
        ]
        await self.send(
            ErrorFrame(id=ident, code=code, message=sendable(message), details=problems)
        )

    async def _handle(self, text: str) -> None:
        """Answer one client message; a bad one gets an error frame, nothing more."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            await self._error(None, "bad_request", "Messages must be JSON objects.")
            return
        if not isinstance(data, dict):
            await self._error(None, "bad_request", "Messages must be JSON objects.")
            return
        ident = echoable_id(data.get("id"))
        if data.get("type") not in MESSAGE_TYPES:
            # The type is not quoted back: it is the client's text, unchecked.
            await self._error(
                ident,
                "bad_request",
                f"Unknown message type; use one of {', '.join(MESSAGE_TYPES)}.",
            )
            return
        try:
            # Strict, as the REST bodies: a JSON type is taken as it is.
            message = CLIENT_MESSAGE.validate_json(text, strict=True)
        except ValidationError as exc:
            # Name fields as the client wrote them, without the union's tag.
            tag = f"{data['type']}."
            details = [
                {**detail, "field": detail["field"].removeprefix(tag)}
                for detail in validation_details(exc)
            ]
            await self._error(
                ident, "validation_error", "The message has invalid fields.", details
            )
            return
        try:
            if isinstance(message, GenerateMessage):
                await self._generate_checked(message)
            elif isinstance(message, CancelMessage):
                await self._cancel(await self._current_principal(), message.id)
            else:
                await self._subscribe(await self._current_principal(), message.id)
        except CredentialsRevoked as exc:
            await self._error(ident, exc.code, exc.message)
            await self.close(WSCloseCode.POLICY_VIOLATION, "credentials revoked")
        except AppError as exc:
            await self._error(ident, exc.code, exc.message, exc.details)
        except DEPENDENCY_ERRORS:
            log.warning("live message: a dependency is unreachable", exc_info=True)
            unavailable = dependency_unavailable()
            await self._error(ident, unavailable.code, unavailable.message)
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("live message failed (error id %s)", error_id)
            await self._error(
                ident,
                "internal_error",
                f"Something went wrong on our side (error id {error_id}).",
            )

    async def _current_principal(self) -> Principal:
        """The socket's caller, re-read: a revoked token or lapsed premium counts."""
        token = await find_token_by_id(self._principal.token.id)
        if token is None:
            raise CredentialsRevoked(
                "Your token was revoked or has expired; sign in again."
            )
        self._principal = Principal(token.user, token, self._principal.via)
        return self._principal

    def _check_room(self, key: str | None = None) -> None:
        """429 when this socket follows as many generations as it may (one
        already followed, `key`, needs no more room)."""
        active = [k for k, relay in self._relays.items() if not relay.done()]
        if key is not None and key in active:
            return
        limit = self._app[settings_key].ws_max_relays
        if len(active) >= limit:
            raise RateLimited(
                f"This socket already follows {len(active)} generations (at most "
                f"{limit}); wait for one to finish, or open another socket.",
                retry_after=SOCKET_RETRY_S,
            )

    async def _generate_checked(self, message: GenerateMessage) -> None:
        """`_generate` with the credentials re-checked.

        A premium, verified caller's request without inputs (nothing for a
        stale principal to decide wrongly before the database is asked) has
        its token checked in the statement that locks the user's row, one
        query fewer; any change since the last re-read (a revoked token, a
        lapsed premium, a new default model) takes the long way, nothing
        stored: the credentials re-read first, as every other message.
        """
        principal = self._principal
        if (
            principal.tier is Tier.PREMIUM
            and principal.user.email_verified_at is not None
            and (message.request.model is not None or not principal.user.default_model)
            and not request_sources(message.request)
        ):
            try:
                await self._generate(principal, message, check_token=True)
                return
            except CallerChanged:
                pass
            except AppError:
                # Refused on the principal read before: a revoked token is
                # told so (and the socket closed), a lapsed premium too.
                _require_premium(await self._current_principal())
                raise
        await self._generate(await self._current_principal(), message)

    async def _generate(
        self,
        principal: Principal,
        message: GenerateMessage,
        *,
        check_token: bool = False,
    ) -> None:
        _require_premium(principal)
        # Refused before anything is stored: the new generation needs a relay.
        self._check_room()
        # Inputs fit a message as references to earlier results, or as small
        # base64 images (messages are capped at max_ws_message_bytes).
        sources = request_sources(message.request)
        inputs = await prepare_inputs(
            self._app, principal, sources, num_images=message.request.num_images
        )
        # One Redis budget per message, as a REST request has.
        deadline = Deadline(self._app[settings_key].redis_timeout)
        # As POST /api/v1/generations: the frame shows the place and estimate
        # the enqueue just gave its `queued` event, not a second read of them.
        generation, placed = await submit_and_place(
            self._app,
            principal,
            message.request,
            inputs,
            deadline=deadline,
            check_token=check_token,
        )
        view = await present(
            self._app, generation, images=[], deadline=deadline, live=placed
        )
        await self.send(AcceptedFrame(id=str(generation.id), generation=view))
        self._follow(generation.id)

    async def _subscribe(self, principal: Principal, ident: str) -> None:
        generation = await load_own(principal.user, ident)
        key = str(generation.id)
        if key in self._followed:
            raise Conflict(
                "This socket already follows that generation (its events were "
                "or are being sent); open a new socket to have them replayed."
            )
        self._check_room(key)
        self._follow(generation.id)

    async def _cancel(self, principal: Principal, ident: str) -> None:
        generation = await load_own(principal.user, ident)
        # A relay running before the cancel is bound to relay its `done`.
        relay = self._relays.get(str(generation.id))
        followed = relay is not None and not relay.done()
        await cancel_generation(self._app, generation)
        if followed:
            return
        # Not followed here: answer with how it ended, so the client knows.
        await generation.refresh_from_db(
            fields=["status", "error_code", "error_message"]
        )
        await self.send(
            done_frame(
                str(generation.id), Status(generation.status), error_ref(generation)
            )
        )

    def _follow(self, generation_id: uuid.UUID) -> None:
        key = str(generation_id)
        if len(self._followed) < MAX_FOLLOWED:
            self._followed.add(key)
        running = self._relays.get(key)
        if running is not None and not running.done():
            return  # already relayed on this socket
        relay = asyncio.create_task(
            self._relay(generation_id), name=f"sdapi-relay-{key}"
        )
        self._relays[key] = relay

        def forget(task: asyncio.Task[None]) -> None:
            if self._relays.get(key) is task:
                del self._relays[key]

        relay.add_done_callback(forget)

    async def _relay(self, generation_id: uuid.UUID) -> None:
        ident = str(generation_id)
        try:
            async with contextlib.aclosing(follow(self._app, generation_id)) as events:
                async for event in events:
                    frame = await event_frame(self._app, generation_id, event)
                    if not await self.send(frame):
                        return  # the client is gone; the generation goes on
        except asyncio.CancelledError:
            raise
        except Exception:
            error_id = uuid.uuid4().hex
            log.exception("relay of %s failed (error id %s)", ident, error_id)
            await self._error(
                ident,
                "internal_error",
                f"Following this generation failed (error id {error_id}); "
                "subscribe again.",
            )


def _require_premium(principal: Principal) -> None:
    if principal.tier is not Tier.PREMIUM:
        raise PremiumRequired(
            "Live generation needs a premium account; normal accounts use "
            "POST /api/v1/generations and get their images by email."
        )


# --- the app's sockets ---------------------------------------------------------

live_sockets_key: web.AppKey[weakref.WeakSet[LiveSocket]] = web.AppKey("live_sockets")
# Open WebSockets per user on this process.
live_users_key: web.AppKey[Counter[uuid.UUID]] = web.AppKey("live_users")


def install_live(app: web.Application) -> None:
    """Track the app's live sockets and close them when the server stops."""
    sockets: weakref.WeakSet[LiveSocket] = weakref.WeakSet()
    app[live_sockets_key] = sockets
    app[live_users_key] = Counter()
    app[feeds_key] = {}
    app.on_shutdown.append(close_live_sockets)


@contextlib.contextmanager
def socket_slot(app: web.Application, user_id: uuid.UUID) -> Iterator[None]:
    """Hold one of the user's WebSocket slots on this process, or 429."""
    counts = app[live_users_key]
    limit = app[settings_key].ws_max_sockets_per_user
    if counts[user_id] >= limit:
        raise RateLimited(
            f"You have {counts[user_id]} live WebSockets open here (at most "
            f"{limit}); close one first. One socket can follow many generations.",
            retry_after=SOCKET_RETRY_S,
        )
    counts[user_id] += 1
    try:
        yield
    finally:
        counts[user_id] -= 1
        if counts[user_id] <= 0:
            del counts[user_id]


async def revocations_ctx(app: web.Application) -> AsyncIterator[None]:
    """Close this replica's sockets of tokens revoked anywhere, at once, and
    keep its token cache true (web/token_cache.py)."""
    closing: set[asyncio.Task[None]] = set()
    sockets = app[live_sockets_key]

    def revoked(data: bytes) -> None:
        token_id = data.decode()
        cache.forget_token(token_id)
        for socket in list(sockets):
            if socket.uses_token(token_id):
                task = asyncio.create_task(socket.revoke())
                closing.add(task)
                task.add_done_callback(closing.discard)

    def user_changed(data: bytes) -> None:
        cache.forget_user(data.decode())

    listener = Listener(
        app[redis_key],
        {REVOKED_TOKENS_CHANNEL: revoked, USERS_CHANGED_CHANNEL: user_changed},
    )
    cache = new_token_cache(app, listener)
    task = asyncio.create_task(listener.run(), name="revocations")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, *closing, return_exceptions=True)


async def close_live_sockets(app: web.Application) -> None:
    """Tell every client the server is going away (their work goes on)."""
    registry = app[live_sockets_key]
    await asyncio.gather(
        *(
            socket.close(WSCloseCode.GOING_AWAY, "server shutting down")
            for socket in list(registry)
        ),
        return_exceptions=True,
    )
