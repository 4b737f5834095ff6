"""The dashboard's web server, running on the scheduler's own event loop.

``start_dashboard`` binds a port, builds one tornado application that
serves the Bokeh documents (``/status``, ``/workers``), Bokeh's JavaScript
(``/static/``) and the plain pages (see ``pages.py``), and starts it on the
loop that runs the scheduler. The server reads the scheduler's state
directly, with no comm in between, because it runs on the same loop: a
handler never sees the state half-way through a change.

Working behind a proxy. On Binder and JupyterHub the dashboard is reached
through jupyter-server-proxy as ``/user/NAME/proxy/8787/status``; the proxy
strips ``/user/NAME/proxy/8787`` and forwards ``/status`` here, with the
browser's ``Host`` and ``Origin`` headers. Bokeh's own server writes
root-relative URLs (``/static/js/bokeh.min.js``), which would miss the
prefix, and accepts websockets only from a fixed list of origins, which
would not include the proxy. So this module changes two things:

- every URL in a page is relative (``static/js/bokeh.min.js``), so the
  browser resolves it under whatever prefix it used; BokehJS already builds
  the websocket URL from the page's own location;
- a websocket is accepted when its ``Origin`` names the host the request
  was sent to (``Host``, or ``X-Forwarded-Host`` from a proxy that rewrites
  ``Host``). That is true for the page's own scripts, directly and through
  the proxy, and false for scripts of any other site the browser has open.
  Bokeh's ``BOKEH_ALLOW_WS_ORIGIN`` still adds origins for other set-ups.

``/status/`` works as well as ``/status``: Bokeh also serves its files
under each document's path, and the links in the navigation bar are
written for the path the page was asked for.
"""

import asyncio
import errno
import logging
from urllib.parse import urlparse

from bokeh.resources import Resources
from bokeh.server.tornado import BokehTornado
from bokeh.server.util import bind_sockets
from bokeh.server.views.static_handler import StaticHandler
from bokeh.server.views.ws import WSHandler
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

from .. import config
from ..utils import parse_timedelta
from . import documents, pages

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"

# How many ports after a taken one to try before giving up.
PORT_ATTEMPTS = 100

# A session whose browser tab has gone is dropped after this long; the
# tab may only be reloading, and keeping it briefly is what Bokeh expects.
UNUSED_SESSION_LIFETIME_MS = 5_000
CHECK_UNUSED_SESSIONS_MS = 2_000


class Dashboard:
    """A running dashboard: where it listens, and how to stop it."""

    def __init__(self, scheduler, host, port, application, http_server):
        self.scheduler = scheduler
        self.host = host
        self.port = port
        self._application = application
        self._http_server = http_server
        self._stopped = False

    def __repr__(self):
        return f"<Dashboard http://{self.address}/status>"

    @property
    def address(self):
        """``host:port`` of the dashboard, for building links."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def sessions(self):
        """Return the Bokeh sessions alive now, one per open page.

        A session is kept a few seconds after its page closes, then dropped
        with its periodic updates: with no session, the dashboard is idle.
        """
        return self._application.live_sessions()

    async def stop(self):
        """Stop listening, close every open page and end its updates."""
        if self._stopped:
            return
        self._stopped = True
        self._http_server.stop()
        await self._application.close_sessions()
        self._application.stop()
        try:
            await asyncio.wait_for(
                self._http_server.close_all_connections(), timeout=2
            )
        except asyncio.TimeoutError:
            # A browser that keeps a request open must not hold up the
            # scheduler's shutdown; its socket is closed with the loop.
            logger.debug("dashboard connections still open after 2 s")
        logger.debug("dashboard on port %d stopped", self.port)


async def start_dashboard(scheduler, address):
    """Serve the dashboard for ``scheduler`` at ``address``, such as ":8787".

    Call from a coroutine on the scheduler's event loop. An empty host means
    127.0.0.1; port 0 picks any free port. A taken port moves the dashboard
    to the next free one, with a warning that names it: read ``.port`` of
    the result for the port actually used.
    """
    host, port = parse_address(address)
    sockets, port = _bind_free_port(host, port)

    application = DashboardApplication(scheduler, _update_interval())
    application.initialize(IOLoop.current())
    http_server = HTTPServer(application)
    http_server.add_sockets(sockets)
    application.start()

    dashboard = Dashboard(scheduler, host, port, application, http_server)
    logger.debug("dashboard at http://%s/status", dashboard.address)
    return dashboard


def parse_address(address):
    """Split ``":8787"``, ``"0.0.0.0:0"`` or ``"[::1]:8787"`` into host, port.

    A bare port (``8787`` or ``"8787"``) is accepted too; an empty host is
    127.0.0.1, so the dashboard is private to this machine unless asked.
    """
    text = str(address).strip()
    if text.isdigit():
        return DEFAULT_HOST, int(text)

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(
            f"dashboard address {address!r} is not host:port: use a form "
            f"such as ':8787', '127.0.0.1:8787' or '0.0.0.0:0'"
        )
    return host or DEFAULT_HOST, int(port)


def _bind_free_port(host, port):
    """Bind ``host:port``, or the next free port after it if it is taken."""
    last = port + PORT_ATTEMPTS - 1 if port else port
    for candidate in range(port, min(last, 65535) + 1):
        try:
            sockets, bound = bind_sockets(host, candidate)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise OSError(
                exc.errno,
                f"cannot serve the dashboard on {host}:{candidate}: {exc}; "
                f"pass another dashboard address, such as '127.0.0.1:8787'",
            ) from exc
        if candidate != port:
            logger.warning(
                "dashboard port %d is in use, serving the dashboard on "
                "port %d instead", port, bound,
            )
        return sockets, bound

    raise OSError(
        errno.EADDRINUSE,
        f"dashboard ports {port} to {last} on {host} are all in use: pass "
        f"dashboard_address=':0' to use any free port",
    )


def _update_interval():
    """Return the configured time between page updates, in seconds."""
    return parse_timedelta(config.get("dashboard.update-interval"))


class DashboardApplication(BokehTornado):
    """Bokeh's tornado application with the dashboard's pages and rules.

    It differs from ``BokehTornado`` in the two ways the module docstring
    explains (relative resource URLs, same-origin websockets) and in
    knowing how to end every session when the dashboard stops.
    """

    def __init__(self, scheduler, update_interval):
        self.scheduler = scheduler
        self.websockets = set()
        super().__init__(
            documents.applications(scheduler, update_interval),
            extra_patterns=pages.routes(scheduler),
            use_index=False,
            redirect_root=False,
            unused_session_lifetime_milliseconds=UNUSED_SESSION_LIFETIME_MS,
            check_unused_sessions_milliseconds=CHECK_UNUSED_SESSIONS_MS,
            mem_log_frequency_milliseconds=0,
            default_handler_class=pages.NotFoundHandler,
            default_handler_args={"scheduler": scheduler},
            log_function=_log_request,
        )
        self._use_same_origin_websockets()

    def _use_same_origin_websockets(self):
        """Serve each document's websocket with SameOriginWSHandler."""
        # BokehTornado builds its routes from a fixed table, with no way to
        # name another handler class, so the built routes are retargeted.
        for rule in self.wildcard_router.rules:
            if rule.target is WSHandler:
                rule.target = SameOriginWSHandler

    def resources(self, absolute_url=None):
        """Point pages at Bokeh's JavaScript with URLs relative to the page."""
        return Resources(
            mode="server",
            root_url="",
            path_versioner=StaticHandler.append_version,
        )

    def live_sessions(self):
        """The sessions not yet destroyed, of every document."""
        return [session for context in self.applications.values()
                for session in context.sessions if not session.destroyed]

    async def close_sessions(self, timeout=2):
        """Close every open websocket, then end every document's updates.

        A websocket closes when the browser answers the close frame; waiting
        for that (briefly) lets Bokeh let go of the session in its own order.
        """
        for websocket in list(self.websockets):
            websocket.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.websockets and loop.time() < deadline:
            await asyncio.sleep(0.02)

        for session in self.live_sessions():
            session.destroy()


def _log_request(handler):
    """Log each request at DEBUG: tornado's access log would print every
    404 as a warning in the learner's notebook."""
    request = handler.request
    logger.debug("%d %s %s %.1f ms", handler.get_status(), request.method,
                 request.uri, 1000 * request.request_time())


class SameOriginWSHandler(WSHandler):
    """Bokeh's websocket, accepted from the page's own origin.

    See the module docstring for why the origin is compared with the
    request's own host rather than with a list fixed in advance.
    """

    def check_origin(self, origin):
        origin_host = urlparse(origin).netloc.lower()
        headers = self.request.headers
        own_hosts = {
            headers.get("Host", "").lower(),
            headers.get("X-Forwarded-Host", "").lower(),
        }
        if origin_host and origin_host in own_hosts:
            return True
        return super().check_origin(origin)

    def open(self):
        self.application.websockets.add(self)
        return super().open()

    def on_close(self):
        self.application.websockets.discard(self)
        connection = self.connection
        session = connection.session if connection is not None else None
        if session is not None and session.destroyed:
            # The browser answered after the dashboard stopped and ended
            # the session: only the connection is left to forget.
            self.application.client_lost(connection)
            return
        super().on_close()
