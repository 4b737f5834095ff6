"""Display: how minidask objects look in a notebook and in a terminal.

Clusters, clients, futures and logs each have two faces: a one-line text
``repr`` for the terminal and an HTML view for Jupyter (``_repr_html_``).
This module draws both, and the progress bar of :func:`progress`.

Everything here works on plain data, not on the classes that own it: a
cluster hands over a dict shaped like the one below, a client the same
with a ``"cluster"`` entry, so the drawing can be read, tested and changed
without starting a scheduler.  The worker dicts are the entries of
``scheduler_info()["workers"]``::

    {"type": "LocalCluster", "name": "a1b2c3", "status": "running",
     "scheduler_address": "tcp://127.0.0.1:40123",
     "dashboard_link": "http://127.0.0.1:8787/status",   # or None
     "workers": {"tcp://127.0.0.1:40200": {
         "address": "tcp://127.0.0.1:40200", "name": 0, "nthreads": 2,
         "memory_limit": 2147483648,                      # or None
         "host": "127.0.0.1", "nanny": "tcp://127.0.0.1:40199",
         "last_seen": 1764756304.5,                       # unix time
         "metrics": {"cpu": 12.5, "memory": 104857600,
                     "managed_bytes": 4096, "executing": 1,
                     "in_memory": 3}}}}

The HTML is rendered from Jinja2 templates in ``minidask/templates`` with
autoescaping on, so a worker named ``<script>`` shows as text.  All styling
is inline: Jupyter removes ``<style>`` blocks from the outputs of notebooks
it does not trust, such as a tutorial notebook opened for the first time.
"""

import re
import threading
import time

import jinja2

from minidask.utils import format_bytes

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("minidask", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _render(name, **context):
    """Render one template of ``minidask/templates`` with `context`."""
    return _templates.get_template(name).render(**context)


# -- small formatters -------------------------------------------------------


def _format_age(seconds):
    """Say how long ago something happened, for a heartbeat column."""
    if seconds is None:
        return "never"
    if seconds < 1:
        return "just now"
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _format_percent(value):
    """Format a CPU percentage, or a dash when the worker has not said."""
    return "–" if value is None else f"{value:.0f}%"


def _link(url):
    """Split a dashboard address into what to link to and what to show.

    Only http and https addresses, and paths on the notebook's own server
    (``/user/ana/proxy/8787/status``, from a JupyterHub ``dashboard.link``),
    become links: anything else (a missing dashboard, a ``javascript:``
    string from a bad config) is shown as text.
    """
    if not url:
        return {"href": None, "text": "not available"}
    if re.match(r"https?://|/(?![/\\])", str(url), re.IGNORECASE):
        return {"href": str(url), "text": str(url)}
    return {"href": None, "text": str(url)}


# -- workers and their totals ----------------------------------------------


def _memory_level(fraction):
    """Name how full a worker's memory is, for the colour of its bar."""
    if fraction < 0.6:
        return "low"
    if fraction < 0.8:
        return "high"
    return "critical"


def _memory_cell(used, limit):
    """The memory column of one worker: text, and a bar when it has a limit."""
    used_text = "–" if used is None else format_bytes(used)
    if not limit:
        return {"text": used_text, "percent": None, "level": None}

    fraction = min((used or 0) / limit, 1.0)
    return {
        "text": f"{used_text} / {format_bytes(limit)}",
        "percent": round(fraction * 100),
        "level": _memory_level(fraction),
    }


def _worker_row(address, info, now):
    """Turn one ``scheduler_info()`` worker entry into strings to show."""
    metrics = info.get("metrics") or {}
    memory = _memory_cell(metrics.get("memory"), info.get("memory_limit"))
    last_seen = info.get("last_seen")
    age = None if last_seen is None else now - last_seen
    return {
        "name": str(info.get("name", address)),
        "address": address,
        "nanny": info.get("nanny"),
        "threads": info.get("nthreads", 0),
        "cpu": _format_percent(metrics.get("cpu")),
        "memory": memory,
        "executing": metrics.get("executing", 0),
        "in_memory": metrics.get("in_memory", 0),
        "last_seen": _format_age(age),
    }


def _worker_rows(workers):
    """Rows for the worker table, in the order the scheduler listed them."""
    now = time.time()
    return [_worker_row(a, w, now) for a, w in (workers or {}).items()]


def _totals(workers):
    """Count workers and add up their threads and memory limits.

    One worker without a memory limit makes the whole cluster unlimited.
    """
    workers = list((workers or {}).values())
    limits = [w.get("memory_limit") for w in workers]
    if any(limit is None for limit in limits):
        memory = "no limit"
    else:
        memory = format_bytes(sum(limits))
    return {
        "workers": len(workers),
        "threads": sum(w.get("nthreads", 0) for w in workers),
        "memory": memory,
    }


# -- clusters and clients ---------------------------------------------------


def _cluster_view(info):
    """Everything the cluster template shows, as plain strings and rows."""
    workers = info.get("workers") or {}
    return {
        "type": info.get("type") or "Cluster",
        "name": info.get("name") or "",
        "status": str(info.get("status") or "unknown"),
        "scheduler_address": info.get("scheduler_address") or "–",
        "dashboard": _link(info.get("dashboard_link")),
        "totals": _totals(workers),
        "workers": _worker_rows(workers),
    }


def cluster_html(info):
    """HTML view of a cluster, for ``Cluster._repr_html_``."""
    return _render("cluster.html", cluster=_cluster_view(info))


def cluster_text(info):
    """One-line repr of a cluster.

    ``LocalCluster(a1b2c3, 'tcp://127.0.0.1:40123', workers=2, threads=2,
    memory=3.00 GiB)``, with ``status=...`` added unless it is running.
    """
    view = _cluster_view(info)
    totals = view["totals"]
    text = (
        f"{view['type']}({view['name']}, {info.get('scheduler_address')!r}, "
        f"workers={totals['workers']}, threads={totals['threads']}, "
        f"memory={totals['memory']}"
    )
    if view["status"] != "running":
        text += f", status={view['status']}"
    return text + ")"


def _client_view(info):
    """Everything the client template shows."""
    cluster = info.get("cluster")
    workers = info.get("workers") or {}
    return {
        "id": info.get("id") or "",
        "status": str(info.get("status") or "unknown"),
        "scheduler_address": info.get("scheduler_address") or "–",
        "dashboard": _link(info.get("dashboard_link")),
        "totals": _totals(workers),
        "workers": _worker_rows(workers),
        "cluster": None if cluster is None else _cluster_view(cluster),
    }


def client_html(info):
    """HTML view of a client, with its cluster's view folded inside."""
    return _render("client.html", client=_client_view(info))


def client_text(info):
    """One-line repr of a client.

    ``<Client: 'tcp://127.0.0.1:40123' workers=2, threads=4,
    memory=3.00 GiB>`` while connected, ``<Client: 'tcp://...' closed>``
    once it is not.
    """
    address = info.get("scheduler_address")
    if not address:
        return "<Client: not connected>"
    status = info.get("status")
    if status != "running":
        return f"<Client: {address!r} {status}>"
    totals = _totals(info.get("workers"))
    return (
        f"<Client: {address!r} workers={totals['workers']}, "
        f"threads={totals['threads']}, memory={totals['memory']}>"
    )


# -- futures ----------------------------------------------------------------


def future_html(key, status, type_name=None):
    """HTML view of a future: its key, its status in colour, its type."""
    return _render(
        "future.html", key=str(key), status=str(status), type_name=type_name
    )


def future_text(key, status, type_name=None):
    """One-line repr of a future, ``<Future: finished, type: int, key: k>``."""
    type_part = f", type: {type_name}" if type_name else ""
    return f"<Future: {status}{type_part}, key: {key}>"


# -- logs -------------------------------------------------------------------

# The level is the first level word on the line; a line without one (a
# traceback under an ERROR record) belongs to the record above it.
_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\b")
_LEVEL_NAMES = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARN": "warning",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "critical",
    "FATAL": "critical",
}


def _classify_lines(text):
    """Pair every line of a log text with its level name."""
    lines = []
    level = "info"
    for line in str(text).splitlines():
        match = _LEVEL_WORD.search(line)
        if match:
            level = _LEVEL_NAMES[match.group(1)]
        lines.append({"text": line, "level": level, "record": bool(match)})
    return lines


def _log_section(source, text):
    """One source's lines with counts of its warnings and errors."""
    lines = _classify_lines(text)
    records = [line["level"] for line in lines if line["record"]]
    return {
        "source": str(source),
        "lines": lines,
        "warnings": records.count("warning"),
        "errors": records.count("error") + records.count("critical"),
    }


class Logs(dict):
    """Log text by source: ``"Cluster"``, ``"Scheduler"``, one per worker.

    Each value is the text of that source's log, newest line first.  In a
    notebook every source is a section that opens on a click, with
    warnings in amber and errors in red; in a terminal the repr prints the
    lines under their source.
    """

    @classmethod
    def from_records(cls, records, newest_first=True):
        """Build Logs from ``{source: [(level, message), ...]}``.

        `newest_first` says the lists already start with the newest record,
        as ``get_scheduler_logs`` returns them; pass False for lists in the
        order the records were logged.  A message that does not carry its
        level word (an unformatted record) gets it as a prefix, so the
        notebook view can still colour it.
        """
        logs = cls()
        for source, source_records in records.items():
            ordered = list(source_records)
            if not newest_first:
                ordered.reverse()
            logs[source] = "\n".join(_record_line(*r) for r in ordered)
        return logs

    def _repr_html_(self):
        sections = [_log_section(s, text) for s, text in self.items()]
        return _render("logs.html", sections=sections)

    def __repr__(self):
        parts = []
        for source, text in self.items():
            lines = str(text).splitlines()
            if not lines:
                parts.append(f"    {source!r}: '',")
                continue
            parts.append(f"    {source!r}:")
            parts.extend(f"        {line}" for line in lines)
        if not parts:
            return "Logs({})"
        return "Logs({\n" + "\n".join(parts) + "\n})"


def _record_line(level, message):
    """The text line for one ``(level, message)`` log record."""
    message = str(message)
    if re.search(rf"\b{re.escape(str(level))}\b", message):
        return message
    return f"{level} - {message}"


# -- progress bar -----------------------------------------------------------


def _is_future(obj):
    """Whether `obj` looks like a future: it can be waited on."""
    return callable(getattr(obj, "done", None)) and callable(
        getattr(obj, "add_done_callback", None)
    )


def _flatten_futures(futures):
    """List the futures in a future, or in nested lists, tuples and dicts.

    The same future object listed twice is counted once.
    """
    found = {}
    pending = [futures]
    while pending:
        item = pending.pop()
        if _is_future(item):
            found.setdefault(id(item), item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        else:
            raise TypeError(
                f"progress() takes futures, or lists and dicts of them; got "
                f"{item!r} of type {type(item).__name__}: pass the futures "
                f"returned by submit() or map()"
            )
    return list(found.values())


class _Tally:
    """Counts finished futures; fed by callbacks on any thread.

    The callbacks only count and wake the waiting thread.  The bar itself
    is drawn by the thread that called :func:`progress`, because neither a
    terminal line nor a notebook widget should be drawn from two threads.
    """

    def __init__(self):
        self._seen = set()
        self.errors = 0
        self.cancelled = 0
        self._changed = threading.Condition()

    def finished(self, future):
        """Record one finished future (a second call for it is ignored)."""
        with self._changed:
            if id(future) in self._seen:
                return
            self._seen.add(id(future))
            status = getattr(future, "status", None)
            self.errors += status == "error"
            self.cancelled += status == "cancelled"
            self._changed.notify_all()

    def wait(self, drawn, timeout):
        """Wait for more than `drawn` done futures; return the counts."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._seen) > drawn, timeout)
            return len(self._seen), self.errors, self.cancelled


def _bar_class(notebook):
    """The tqdm class to draw with: widget, terminal, or picked for us."""
    if notebook is None:
        from tqdm.auto import tqdm
    elif notebook:
        from tqdm.notebook import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def _postfix(errors, cancelled):
    """The words after the bar: how many futures failed or were cancelled."""
    postfix = {}
    if errors:
        postfix["errors"] = errors
    if cancelled:
        postfix["cancelled"] = cancelled
    return postfix


def progress(futures, notebook=None):
    """Draw a progress bar until every future is done, then return None.

    `futures` is one future, or lists, tuples and dicts of them, nested as
    you like.  `notebook` picks the bar: True for the Jupyter widget (needs
    ipywidgets), False for text, None to let tqdm choose.  Failed and
    cancelled futures count as done and are named after the bar; the bar
    turns red on the first failure.

    Like dask's ``progress`` with a synchronous client, this blocks; press
    Ctrl-C (interrupt the kernel) to stop watching.  The futures go on.
    """
    found = _flatten_futures(futures)
    if not found:
        return None

    tally = _Tally()
    for future in found:
        future.add_done_callback(tally.finished)
    for future in found:
        # Some futures run callbacks added after they finished, some never
        # do; the tally ignores a second report, so ask here as well.
        if future.done():
            tally.finished(future)

    with _bar_class(notebook)(total=len(found), unit="task") as bar:
        drawn = 0
        while drawn < len(found):
            # The timeout keeps Ctrl-C working and the elapsed time moving.
            done, errors, cancelled = tally.wait(drawn, timeout=0.5)
            if errors and bar.colour != "red":
                bar.colour = "red"
            if done == drawn:
                bar.refresh()
                continue
            bar.set_postfix(_postfix(errors, cancelled), refresh=False)
            bar.update(done - drawn)
            drawn = done
    return None
