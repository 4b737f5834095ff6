"""One Bokeh document per open page, and the clock that keeps it current.

Bokeh builds a fresh document for each browser tab that opens ``/status``
or ``/workers`` (a *session*) by calling a function given here. That
function lays out the page's components (``components.py``), fills them
once so the page shows data as soon as it draws, and adds a periodic
callback to the document that calls each component's ``update()``.

Why the callback lives on the document: Bokeh removes a document's
callbacks when it drops the session, a few seconds after its tab closed.
With no tab open there is no callback and the dashboard does no work at
all. A session whose page was fetched but whose websocket is not (or no
longer) connected skips its updates: nobody would see them.
"""

import functools
import logging

from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.layouts import column, row

from . import pages
from .components import (
    GroupColors, Progress, TaskStream, WorkerCPU, WorkerMemory, WorkerTable,
)

logger = logging.getLogger(__name__)


def applications(scheduler, update_interval):
    """The Bokeh applications of the dashboard, by URL path."""
    colors = GroupColors()
    builders = {
        "/status": functools.partial(status_document, colors=colors),
        "/workers": workers_document,
    }
    return {
        path: Application(FunctionHandler(functools.partial(
            build, builder=builder, scheduler=scheduler,
            update_interval=update_interval, page=path.strip("/"),
        )))
        for path, builder in builders.items()
    }


def build(doc, builder, scheduler, update_interval, page):
    """Fill ``doc`` for one new session and start its updates."""
    root, components = builder(scheduler)
    doc.add_root(root)
    doc.title = f"minidask: {page}"
    doc.template = pages.templates.get_template("bokeh_page.html")
    request = doc.session_context and doc.session_context.request
    link_root = pages.relative_root(request.path) if request else ""
    doc.template_variables.update(
        pages.page_variables(scheduler, page, link_root))

    for component in components:
        _update(component)
    doc.add_periodic_callback(
        functools.partial(refresh, doc, components),
        int(update_interval * 1000),
    )


def refresh(doc, components):
    """Update every component of ``doc``, if its page is being watched."""
    session = doc.session_context and doc.session_context.session
    if session is None or session.connection_count == 0:
        return
    for component in components:
        _update(component)


def _update(component):
    """Update one component; a failure is logged, the others go on."""
    try:
        component.update()
    except Exception:
        # Logged once: a chart that fails on every tick would flood the log.
        if not getattr(component, "failed", False):
            component.failed = True
            logger.exception("dashboard %s could not update",
                             type(component).__name__)


def status_document(scheduler, colors):
    """The /status page: task stream on top, progress and workers below."""
    stream = TaskStream(scheduler, colors)
    progress = Progress(scheduler, colors)
    memory = WorkerMemory(scheduler)
    cpu = WorkerCPU(scheduler)

    workers = column(memory.figure, cpu.figure, sizing_mode="stretch_width")
    below = row(progress.figure, workers, sizing_mode="stretch_width")
    root = column(stream.figure, below, sizing_mode="stretch_width")
    return root, [stream, progress, memory, cpu]


def workers_document(scheduler):
    """The /workers page: a table of the workers."""
    table = WorkerTable(scheduler)
    return table.layout, [table]
