"""HTTP: health, Prometheus metrics, the JSON API and a small status page (no JavaScript).

Every endpoint only reads the ResultStore; none can make the daemon send anything to a VM.
The server sheds what it cannot serve, so no local client can take the file descriptors
the VMs' inspections need: connections are capped below the fd limit (over the cap the
oldest is closed), a request must be complete within a deadline, idle keep-alive
connections close, and accept() errors are logged once per burst. Our own accept loop
(not asyncio's server) admits one connection at a time, so the cap really bounds fds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import resource
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from qmpguard.daemon.page import status_page, vm_page
from qmpguard.daemon.results import ResultStore
from qmpguard.daemon.watch import RESOURCE_ERRNOS, describe_fault, fault_location

log = structlog.get_logger("qmpguard.daemon")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = frozenset({"/healthz"})

#: A request's headers must have arrived within this many seconds of the connection
#: opening (or of the TLS handshake, itself bounded by as long), or of the previous
#: response; so an idle keep-alive connection is closed after as long. Slowloris
#: trickling a header byte at a time gains nothing: arriving bytes do not extend it.
REQUEST_DEADLINE_S = 10.0
#: An unread request body (no endpoint reads one) is drained this long, then closed.
LINGER_S = 2.0
#: Never more open HTTP connections than this, nor than a quarter of RLIMIT_NOFILE.
MAX_CONNECTIONS = 256
#: Connections the kernel queues until we accept them: they cost no descriptor of ours
#: (we accept one at a time), and a deep queue keeps a flood from dropping SYNs.
LISTEN_BACKLOG = 1024
#: A burst of the same log event ends after this many seconds without one.
BURST_QUIET_S = 10.0
#: accept() failed for lack of descriptors: try again after this long.
ACCEPT_RETRY_S = 1.0


def connection_cap(nofile: int | None = None) -> int:
    """Open connections allowed: min(256, RLIMIT_NOFILE/4), so HTTP clients can never
    take the descriptors the QMP sockets and the discovery globs need."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < 0 or nofile == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, nofile // 4))


@dataclass
class BurstLog:
    """One log line per burst of an event, not one per occurrence (a flood of accept()
    errors wrote 175 MB a minute). The line of the next burst says how many the
    previous one had."""

    event: str
    quiet: float = BURST_QUIET_S
    clock: Callable[[], float] = time.monotonic
    last: float | None = None
    count: int = 0

    def note(self, **fields: Any) -> None:
        now = self.clock()
        if self.last is None or now - self.last >= self.quiet:
            previous, self.count = self.count, 0
            with contextlib.suppress(Exception):  # a full disk must not break serving
                log.warning(self.event, previous_burst=previous or None, **fields)
        self.last = now
        self.count += 1


@dataclass
class HttpStats:
    """What the HTTP layer shed, for /metrics (the log only says when a burst starts)."""

    cap: int
    open: int = 0
    shed: int = 0
    accept_errors: int = 0


class GuardedConnection(asyncio.Protocol):
    """One client connection, counted from accept() (before any TLS handshake, which a
    client holding the socket idle never finishes) and handed to aiohttp's protocol
    once it speaks HTTP."""

    def __init__(self, limiter: ConnectionLimiter) -> None:
        self.limiter = limiter
        self.transport: asyncio.BaseTransport | None = None
        self.inner: asyncio.Protocol | None = None
        self.early: list[bytes] = []  # decrypted before the handshake task resumed
        self.early_eof = False
        self.closed = False
        self.handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.limiter.admit(self)
        if self.limiter.tls is None:
            self._attach(transport)
        else:
            self.handshake = asyncio.ensure_future(self._start_tls(transport))

    async def _start_tls(self, raw: asyncio.BaseTransport) -> None:
        """The handshake on the counted raw connection (bounded by the deadline)."""
        assert self.limiter.tls is not None
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                raw,  # type: ignore[arg-type]
                self,
                self.limiter.tls,
                server_side=True,
                ssl_handshake_timeout=REQUEST_DEADLINE_S,
            )
        except Exception:  # bad or no handshake: the client's problem, not a log line
            self.abort()
            return
        if secure is None or self.closed:
            self.abort()
            return
        self.transport = secure
        self._attach(secure)

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        self.inner = self.limiter.factory()
        self.inner.connection_made(transport)
        for data in self.early:
            self.inner.data_received(data)
        self.early.clear()
        if self.early_eof:
            self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        self.early_eof = True
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.limiter.release(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def abort(self) -> None:
        """Close at once (no lingering): frees the descriptor on the next loop turn."""
        self.closed = True
        self.limiter.release(self)
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]


class ConnectionLimiter:
    """The listening socket's protocol factory. At most `stats.cap` connections are
    open: a new one over the cap closes the oldest, so a client that just connected is
    served while a flood of held connections only evicts its own."""

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], cap: int, tls: ssl.SSLContext | None
    ) -> None:
        self.factory = factory
        self.tls = tls
        self.stats = HttpStats(cap)
        self.open: dict[GuardedConnection, None] = {}  # insertion order: oldest first
        self.shed_log = BurstLog("http_connections_shed")
        self.accept_log = BurstLog("http_accept_failed")

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    def admit(self, conn: GuardedConnection) -> None:
        while len(self.open) >= self.stats.cap:
            oldest = next(iter(self.open))
            oldest.abort()
            self.stats.shed += 1
            self.shed_log.note(cap=self.stats.cap, reason="connection cap reached")
        self.open[conn] = None
        self.stats.open = len(self.open)

    def release(self, conn: GuardedConnection) -> None:
        self.open.pop(conn, None)
        self.stats.open = len(self.open)

    def abort_all(self) -> None:
        for conn in list(self.open):
            conn.abort()

    async def accept_forever(self, listener: socket.socket) -> None:
        """Accept one connection at a time and admit it before the next: descriptors in
        flight stay at the cap + 1. (asyncio's own server accepts up to `backlog` per
        loop turn before any protocol runs, and closes an evicted socket a turn later:
        256 descriptors ran out with a cap of 64.)"""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                await self._accept_failed(exc)
                continue
            try:
                await loop.connect_accepted_socket(self, conn)
            except OSError:
                conn.close()  # the client left before its transport existed

    async def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors: one log line per burst, retry in a second. Anything else
        (the client reset first) is the client's problem: next one."""
        if exc.errno not in RESOURCE_ERRNOS:
            return
        self.stats.accept_errors += 1
        self.accept_log.note(error=describe_fault(exc), retry=f"every {ACCEPT_RETRY_S:g}s")
        await asyncio.sleep(ACCEPT_RETRY_S)


class HttpCollector(Collector):
    """qmpguard_http_* metrics: the cap, what is open, what was shed."""

    def __init__(self, stats: HttpStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "qmpguard_http_connection_limit",
            "Open HTTP connections allowed (min(256, RLIMIT_NOFILE/4))",
            value=self.stats.cap,
        )
        yield GaugeMetricFamily(
            "qmpguard_http_connections", "Open HTTP connections", value=self.stats.open
        )
        yield CounterMetricFamily(
            "qmpguard_http_connections_shed",
            "Connections closed to stay under the cap (oldest first)",
            value=self.stats.shed,
        )
        yield CounterMetricFamily(
            "qmpguard_http_accept_errors",
            "accept() failures for lack of descriptors or memory",
            value=self.stats.accept_errors,
        )


class AsyncioErrorLog:
    """The event loop's exception handler: one JSON line per burst of the same message,
    with the exception's type and innermost frame, never a multi-line traceback."""

    def __init__(self) -> None:
        self.bursts: dict[str, BurstLog] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message") or "asyncio error")
        burst = self.bursts.setdefault(message, BurstLog("asyncio_error"))
        burst.note(
            message=message,
            error=describe_fault(exc) if exc is not None else None,
            location=fault_location(exc) if exc is not None else None,
        )


@dataclass
class HttpServer:
    """The running HTTP server: our accept loops feeding aiohttp's handler."""

    runner: web.AppRunner
    limiter: ConnectionLimiter
    sockets: list[socket.socket] = field(default_factory=list)
    loops: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop accepting, finish aiohttp's connections, drop half-open ones."""
        for task in self.loops:
            task.cancel()
        for task in self.loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self.sockets:
            sock.close()
        await self.runner.cleanup()
        self.limiter.abort_all()


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of `host` (as asyncio's
    create_server does: IPv6 sockets are IPv6-only); OSError if one cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    registry: CollectorRegistry,
) -> HttpServer:
    """Serve `app` with the limits above; OSError if the address cannot be bound."""
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=REQUEST_DEADLINE_S,
        lingering_time=LINGER_S,
        shutdown_timeout=5.0,
    )
    await runner.setup()
    assert runner.server is not None
    limiter = ConnectionLimiter(runner.server, connection_cap(), tls)
    try:
        sockets = listening_sockets(host, port, LISTEN_BACKLOG)
    except BaseException:
        await runner.cleanup()
        raise
    asyncio.get_running_loop().set_exception_handler(AsyncioErrorLog())
    http = HttpServer(runner, limiter, sockets)
    http.loops = [asyncio.create_task(limiter.accept_forever(sock)) for sock in sockets]
    registry.register(HttpCollector(limiter.stats))
    return http


def build_app(
    store: ResultStore,
    registry: CollectorRegistry,
    token: str | Callable[[], str | None] | None,
) -> web.Application:
    """The aiohttp application; with a token, every path but /healthz needs it. A
    callable `token` is asked on every request: a reload (SIGHUP) changes it at once."""
    current_token: Callable[[], str | None] = token if callable(token) else (lambda: token)
    endpoints = Endpoints(store, registry)
    app = web.Application(middlewares=[require_token(current_token)], client_max_size=64 * 1024)
    app.on_response_prepare.append(_no_server_header)
    app.router.add_get("/healthz", endpoints.healthz)
    app.router.add_get("/metrics", endpoints.metrics)
    app.router.add_get("/api/v1/vms", endpoints.vms)
    app.router.add_get("/api/v1/vms/{name:.+}", endpoints.vm)
    app.router.add_get("/vms/{name:.+}", endpoints.page)
    app.router.add_get("/", endpoints.index)
    return app


def require_token(current_token: Callable[[], str | None]) -> Middleware:
    """Middleware: 401 unless the request carries the bearer token asked for now (none
    asked: everything is open; /healthz is always open, for probes)."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        required = current_token()
        if required is not None and request.path not in PUBLIC:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {required}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response(
                    {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    return auth


async def _no_server_header(_: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's default Server header names its own and Python's version."""
    response.headers["Server"] = "qmpguard"


@dataclass(frozen=True)
class Endpoints:
    """The request handlers: each only reads the store (or the registry built over it)."""

    store: ResultStore
    registry: CollectorRegistry

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def vms(self, _: web.Request) -> web.Response:
        return web.json_response([r.summary() for _, r in sorted(self.store.vms.items())])

    async def vm(self, request: web.Request) -> web.Response:
        doc = self.store.document(request.match_info["name"])
        if doc is None:
            return web.json_response({"error": "no such VM"}, status=404)
        return web.json_response(doc)

    async def page(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.store.vms:
            return web.Response(status=404, text="no such VM\n")
        html = vm_page(name, self.store.vms[name].shown())
        return web.Response(text=html, content_type="text/html")

    async def index(self, request: web.Request) -> web.Response:
        only = request.query.get("problems") == "1"
        page = status_page(self.store.vms.values(), time.time(), problems_only=only)
        return web.Response(text=page, content_type="text/html")
