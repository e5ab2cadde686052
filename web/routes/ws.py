"""The live WebSocket: generate, subscribe and cancel; events relayed as frames."""

from __future__ import annotations

from aiohttp import web

from web.appkeys import settings_key
from web.auth import Principal, authenticate, bearer_secret, origin_allowed
from web.errors import BadRequest, Forbidden, Unauthorized
from web.live_socket import (
    LiveSocket,
    LiveWebSocket,
    live_sockets_key,
    socket_slot,
)
from web.openapi import ApiRoutes, ErrorBody, Response
from web.sessions import SESSION_COOKIE

routes = ApiRoutes(tags=["live"])

LIVE_DESCRIPTION = """\
Authenticate on the upgrade with `Authorization: Bearer <token>`, a `token`
query parameter, or the session cookie from one of this service's origins.

Client -> server (JSON text frames):
`{"type": "generate", "request": GenerationRequest}` (premium),
`{"type": "subscribe", "id"}`, `{"type": "cancel", "id"}`.
Messages are handled in the order they arrive, so `accepted` and `error`
answers to `generate` come in the order of the requests.

Server -> client: `accepted` {generation}, `queued` {position}, `started`,
`progress` {step, total, preview}, `image` {index, seed, url, data},
`done` {status, error when failed}, `error` {id, code, message, details}.
A subscription replays the events already emitted before live ones. A bad
message gets an `error` frame and the connection stays open; a message over
the size limit closes it with code 1009 after an `error` frame.

Limits: a user may hold a few sockets open at once (the upgrade is refused
with 429 beyond them), and one socket may follow a bounded number of
unfinished generations at once (a `generate` or `subscribe` beyond it gets
an `error` frame with code `rate_limited`). A socket whose token is revoked
or expires gets an `error` frame with code `unauthorized` and is closed with
code 1008.
"""


async def _caller(request: web.Request) -> Principal:
    """Who opens the socket; the Origin is checked before anything is upgraded."""
    token = request.query.get("token") or None
    uses_cookie = token is None and bearer_secret(request) is None
    # A page on another site can make the browser send our cookie on a
    # WebSocket upgrade (no CORS there): only our own origins may use it.
    if (
        uses_cookie
        and SESSION_COOKIE in request.cookies
        and not origin_allowed(request)
    ):
        raise Forbidden("This origin may not use the session cookie here.")
    principal = await authenticate(request, token=token)
    if principal is None:
        raise Unauthorized()
    return principal


@routes.route(
    "GET",
    "/api/v1/ws",
    summary="Live generation over a WebSocket",
    description=LIVE_DESCRIPTION,
    auth=_caller,
    responses=[
        Response(101, "Switching to the WebSocket protocol"),
        Response(429, "Too many live WebSockets open for this user", ErrorBody),
    ],
)
async def live(request: web.Request, *, principal: Principal) -> web.StreamResponse:
    """Upgrade to a WebSocket after authentication; serve until the client goes."""
    settings = request.app[settings_key]
    ws = LiveWebSocket(
        max_msg_size=settings.max_ws_message_bytes, heartbeat=settings.ws_heartbeat
    )
    if not ws.can_prepare(request).ok:
        raise BadRequest("This endpoint speaks WebSocket: send an Upgrade request.")
    # Counted from before the upgrade: refused ones get a JSON 429 instead.
    with socket_slot(request.app, principal.user.id):
        await ws.prepare(request)
        socket = LiveSocket(request.app, ws, principal)
        request.app[live_sockets_key].add(socket)
        await socket.serve()
    return ws
