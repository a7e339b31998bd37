"""Read timeouts, a connection bound and cancelled request timers for the uvicorn server of each BentoML 1.4 worker.

uvicorn times out nothing while a request comes in: its only timer is keep-alive's, which the first byte of a request
cancels, so a client that sends a header byte every few seconds (slowloris) or stops in the middle of its body holds
its connection for ever (Kludex/uvicorn#157, closed without one); and BentoML 1.4 builds `uvicorn.Config` itself with
no `limit_concurrency` and no way to pass one (bentoml/BentoML#4671), so connections are bounded only by the worker's
file descriptors: 20,000 silent ones left `/classify` unanswered (issue 24, item 2). An ASGI middleware sees a request
only once its headers are complete, so this works on uvicorn's h11 protocol (the one `http="auto"` picks without
httptools), as three small wrappers installed by `guard_connections` (the API worker calls it before it serves):

- `connection_made`: a connection past twice the bound is closed at once (a flood cannot take the file descriptors),
  and a timer starts: the request's headers must be complete within `header_timeout_s`;
- the timer, re-armed after each response (keep-alive): while the headers are incomplete it closes the connection
  with 408; while the body comes in, it allows `body_timeout_s` more each time bytes arrived since it last looked;
- uvicorn's own `limit_concurrency` (read from the protocol) answers a request 503 while the worker has more than
  `max_connections` connections: here with a JSON body that says so, and Retry-After.

Also `CancelledTimeouts`: BentoML's request timeout middleware with its timer cancelled once the request is answered
(installed by `cancel_request_timeouts` at import of the service).

tests/test_service.py's test_stalled_requests_are_closed_and_connections_past_the_bound_get_503 fails once this module
no longer applies (httptools installed, uvicorn's protocol renamed); `guard_connections` refuses to start then.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from uvicorn.protocols.http import auto, h11_impl

log = logging.getLogger("bentoml.dogs_vs_cats")

TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


def guard_connections(header_timeout_s: float, body_timeout_s: float, max_connections: int) -> None:
    """Install the read timeouts and the connection bound on uvicorn's h11 protocol, in this process."""
    protocol = h11_impl.H11Protocol
    if auto.AutoHTTPProtocol is not protocol:  # httptools installed: uvicorn would not use the protocol patched here
        raise SystemExit(
            f"uvicorn serves with {auto.AutoHTTPProtocol.__name__}, not H11Protocol: this module cannot time "
            "out stalled requests there; uninstall httptools"
        )
    made, received = protocol.connection_made, protocol.data_received
    response_complete = protocol.on_response_complete
    if getattr(made, "guarded", False):
        return

    def connection_made(self, transport) -> None:
        made(self, transport)
        self.bytes_in = 0
        # uvicorn answers 503 to a request that finds this many connections open (this one counted)
        self.limit_concurrency = max_connections + 1
        if len(self.connections) > 2 * max_connections:
            transport.close()  # a flood: nothing to answer yet, and each connection holds a file descriptor
            return
        self.read_timer = self.loop.call_later(header_timeout_s, expire, self, -1)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        received(self, data)

    def on_response_complete(self) -> None:
        response_complete(self)
        if not self.transport.is_closing():  # kept alive: the next request's headers get header_timeout_s
            self.read_timer.cancel()
            self.read_timer = self.loop.call_later(header_timeout_s, expire, self, -1)

    def expire(self, seen: int) -> None:
        """The timer: close a connection whose request is not in yet, unless its body is still moving."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY and self.bytes_in != seen:  # the body is coming in: give it more time
            self.read_timer = self.loop.call_later(body_timeout_s, expire, self, self.bytes_in)
            return
        if state not in (h11.IDLE, h11.SEND_BODY):  # the request is in (or a response is on its way): not ours
            return
        what = "headers" if state is h11.IDLE else "body"
        limit = header_timeout_s if state is h11.IDLE else body_timeout_s
        log.warning("closed a connection from %s: its request %s stalled past %s s", self.client, what, limit)
        if self.conn.our_state is h11.IDLE:  # nothing answered yet: say why
            body = json.dumps({"error": f"request {what} not received within {limit:g} s"}).encode()
            self.transport.write(TIMED_OUT % (len(body), body))
        self.transport.close()

    connection_made.guarded = True
    protocol.connection_made, protocol.data_received = connection_made, data_received
    protocol.on_response_complete = on_response_complete
    h11_impl.service_unavailable = busy(max_connections)  # the app uvicorn runs for a request past limit_concurrency


def busy(max_connections: int):
    """uvicorn's 503 past limit_concurrency, with a JSON body that says why and when to come back."""
    body = json.dumps(
        {"error": f"busy: this worker has {max_connections} connections open, its limit: retry in a moment"}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]

    async def service_unavailable(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return service_unavailable


class CancelledTimeouts(traffic.TimeoutMiddleware):
    """BentoML 1.4's request timeout (`traffic.timeout`, 504 past it), with its timer cancelled when the request
    is answered. BentoML's own leaves the timer in the event loop until it fires, holding the request's context
    (its OpenTelemetry span) meanwhile: ~4.5 KB per request for `traffic.timeout` seconds, so 120,000 GETs in
    90 s took the API worker from 290 to 840 MB (issue 24, found by bench/load_test.py's made-up paths)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def answered(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, answered))
        try:
            await waiter
        except TimeoutError:
            if task.cancel():
                error = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(error, status_code=504)(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()


def cancel_request_timeouts() -> None:
    """Put CancelledTimeouts where BentoML's app factory imports its timeout middleware from (when it builds the
    app, after the service module is imported)."""
    traffic.TimeoutMiddleware = CancelledTimeouts
