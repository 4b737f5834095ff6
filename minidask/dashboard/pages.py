"""The dashboard's plain pages: logs, health, identity, redirects and 404s.

These are ordinary tornado handlers, rendered once per request from the
Jinja2 templates in ``templates/``; only ``/status`` and ``/workers`` are
live Bokeh documents (``documents.py``). The templates are shared: the
Bokeh pages use ``bokeh_page.html``, which draws the same navigation bar
as the plain pages here.

Every link these pages write is relative (``status``, ``../status``), so
that they keep working when a proxy serves the dashboard under a prefix.
"""

import asyncio
import json
import logging
import os

import jinja2
import tornado.web

from .components import natural_key

logger = logging.getLogger(__name__)

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(["html"]),
)

# The pages in the navigation bar, as (path, label).
NAVIGATION = [("status", "Status"), ("workers", "Workers"), ("logs", "Logs")]

# Log lines per server shown by /logs unless ?n= asks for another number.
DEFAULT_LOG_LINES = 500

# How long /logs waits for the workers' logs before showing what it has.
WORKER_LOGS_TIMEOUT = 5


def routes(scheduler):
    """The URL patterns of the plain pages, for tornado."""
    context = {"scheduler": scheduler}
    return [
        (r"/", RootHandler, context),
        (r"/health", HealthHandler, context),
        (r"/json/identity\.json", IdentityHandler, context),
        (r"/logs", LogsHandler, context),
    ]


def relative_root(path):
    """The relative link from ``path`` to the dashboard's root folder.

    ``/status`` needs nothing (``workers`` is a sibling), ``/status/`` and
    ``/a/b`` need ``../``: relative links resolve against the folder of the
    current path, whatever prefix a proxy added in front of it.
    """
    return "../" * (path.count("/") - 1)


def page_variables(scheduler, page, root=""):
    """What every template needs: where it is and what to link to."""
    return {
        "navigation": NAVIGATION,
        "active": page,
        "root": root,
        "scheduler_address": scheduler.address,
        "version": scheduler.version,
    }


class PageHandler(tornado.web.RequestHandler):
    """A handler that knows the scheduler and renders our templates."""

    def initialize(self, scheduler):
        self.scheduler = scheduler

    def render_page(self, template, page, root="", **variables):
        variables.update(page_variables(self.scheduler, page, root))
        html = templates.get_template(template).render(**variables)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(html)


class RootHandler(PageHandler):
    def get(self):
        # Relative, so that /user/NAME/proxy/8787/ leads to .../8787/status.
        self.redirect("status")


class HealthHandler(PageHandler):
    def get(self):
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish("ok")


class IdentityHandler(PageHandler):
    def get(self):
        identity = dict(self.scheduler.identity())
        identity.setdefault("version", self.scheduler.version)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(identity, default=str))


class LogsHandler(PageHandler):
    """The scheduler's log lines and each worker's, newest first."""

    async def get(self):
        n = self._line_count()
        logs = [("Scheduler", self.scheduler.address,
                 self.scheduler.get_logs(n))]
        error = None
        try:
            workers = await asyncio.wait_for(
                self.scheduler.gather_worker_logs(n), WORKER_LOGS_TIMEOUT
            )
        except Exception as exc:  # the page must show what it does have
            logger.warning("dashboard could not gather worker logs: %r", exc)
            error = f"could not gather the workers' logs: {exc!r}"
            workers = {}
        for address, lines in workers.items():
            logs.append((self._worker_name(address), address, lines))
        logs[1:] = sorted(logs[1:], key=lambda item: natural_key(item[0]))
        self.render_page("logs.html", "logs", logs=logs, error=error, n=n)

    def _line_count(self):
        text = self.get_argument("n", str(DEFAULT_LOG_LINES))
        if not text.isdigit():
            raise tornado.web.HTTPError(
                400, reason=f"n={text!r} is not a number of lines; use ?n=100"
            )
        return int(text)

    def _worker_name(self, address):
        worker = self.scheduler.workers.get(address)
        name = getattr(worker, "name", None)
        return f"Worker {name}" if name is not None else "Worker"


class NotFoundHandler(PageHandler):
    """Any other path: a 404 page with a way back to /status."""

    def prepare(self):
        self.set_status(404)
        self.render_page("not_found.html", None,
                         root=relative_root(self.request.path),
                         path=self.request.path)
