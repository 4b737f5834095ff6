"""The dashboard: live pages about a running cluster, served by the scheduler.

The scheduler calls ``start_dashboard(scheduler, ":8787")`` from a coroutine
on its event loop. From then on the same loop also serves:

- ``/status``: the task stream (one bar per finished task, one row per
  worker thread), progress per task group, memory and CPU per worker;
- ``/workers``: a table of the workers;
- ``/logs``: the scheduler's and every worker's recent log lines;
- ``/health`` (``ok``) and ``/json/identity.json`` for scripts and probes.

``/status`` and ``/workers`` are Bokeh documents: the browser keeps a
websocket open and the server pushes only what changed a few times a second
(``dashboard.update-interval``). Nothing is computed while nobody watches.
Every URL the pages use is relative, so the dashboard also works behind
jupyter-server-proxy on Binder and JupyterHub (see ``server.py``).

The dashboard only shows; it accepts no commands. It has no password
either: anyone who can reach its port can read task names and log lines.
That is why it listens on 127.0.0.1 unless given another address.

The package has four parts:

- ``server.py`` binds the port and assembles the tornado application;
- ``documents.py`` builds one Bokeh document per browser tab and updates it;
- ``components.py`` holds the charts and tables, each reading the
  scheduler's state into a data source;
- ``pages.py`` serves the plain pages, rendered from ``templates/``.
"""

from .server import Dashboard, parse_address, start_dashboard

__all__ = ["Dashboard", "parse_address", "start_dashboard"]
