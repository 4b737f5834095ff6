"""The dashboard's charts and tables, each fed from the scheduler's state.

Every component owns one Bokeh ``ColumnDataSource`` and the figure or
table that draws it. ``update()`` reads the scheduler and changes the
source as little as it can, because each change is a message to the
browser:

- the task stream only grows, so new rows are ``stream``-ed and the oldest
  fall off the front (``rollover``);
- everything else is small (one row per worker or per task group) and is
  compared cell by cell with what the browser has: unchanged cells are not
  sent, changed ones go as a ``patch``, and only a change in the number of
  rows replaces the data.

Components hold no reference to a browser or session; ``documents.py``
decides when to call ``update()``. Each document has its own components,
so two open tabs never share a data source.

The sources carry a ``name`` (``task_stream``, ``progress``, ...) so that
tests and curious learners can find them in the browser as
``Bokeh.documents[0].get_model_by_name("task_stream")``.
"""

import datetime
import logging
import math
import re
import time

from bokeh.layouts import column
from bokeh.models import (
    AdaptiveTicker, ColumnDataSource, DataRange1d, DataTable,
    DatetimeTickFormatter, Div, FactorRange, HoverTool, NumberFormatter,
    NumeralTickFormatter, PrintfTickFormatter, Range1d, TableColumn,
)
from bokeh.plotting import figure

from .. import config
from ..utils import format_bytes

logger = logging.getLogger(__name__)

# Category10 without its red, kept for errors, and its grey, kept for
# waiting work; then their lighter companions from Category20.
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5",
]
ERROR_COLOR = "#d62728"
WAITING_COLOR = "#e6e6e6"

# The task stream shows at most this much of the most recent time; pan
# or zoom out to see earlier work.
TASK_STREAM_WINDOW_MS = 30_000

# Progress shows the newest task groups only: more bars than this would
# be too thin to read.
MAX_PROGRESS_GROUPS = 25

# Progress keeps room for this many bars, so that one group draws a bar as
# thin as each of six would, not one bar filling the whole chart.
MIN_PROGRESS_ROWS = 6


class GroupColors:
    """One colour per task group, the same in every chart and every tab.

    Colours are handed out in the order groups first appear, so the first
    few groups of a computation are always clearly distinct.
    """

    def __init__(self):
        self._colors = {}

    def __call__(self, group):
        color = self._colors.get(group)
        if color is None:
            color = PALETTE[len(self._colors) % len(PALETTE)]
            self._colors[group] = color
        return color


# Shared helpers ------------------------------------------------------------

def update_source(source, data):
    """Make ``source.data`` equal ``data``, sending the browser the least.

    Same columns and the same number of rows: only the changed cells go,
    as one ``patch``, or nothing at all. Otherwise the data is replaced.
    """
    old = source.data
    lengths = {len(values) for values in data.values()}
    if set(old) != set(data) or {len(v) for v in old.values()} != lengths:
        source.data = data
        return

    patches = {}
    for name, values in data.items():
        changed = [
            (index, new)
            for index, (current, new) in enumerate(zip(old[name], values))
            if not _same(current, new)
        ]
        if changed:
            patches[name] = changed
    if patches:
        source.patch(patches)


def _same(a, b):
    """Compare two cells, counting NaN equal to NaN (a missing limit)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def natural_key(text):
    """Sort "worker 2" before "worker 10"."""
    return [int(part) if part.isdigit() else part
            for part in re.split(r"(\d+)", str(text))]


def worker_label(worker):
    """A short name for a worker: "worker 0", or its host:port."""
    name = getattr(worker, "name", None)
    if name is None or str(name) == worker.address:
        return worker.address.split("://")[-1]
    if isinstance(name, int) or str(name).isdigit():
        return f"worker {name}"
    return str(name)


def workers_in_order(scheduler):
    """The scheduler's workers as (label, worker), in natural order."""
    labelled = [(worker_label(w), w) for w in scheduler.workers.values()]
    return sorted(labelled, key=lambda item: natural_key(item[0]))


def set_factors(factor_range, factors):
    """Change a categorical axis only when its categories change."""
    if list(factor_range.factors) != factors:
        factor_range.factors = factors


def _figure(title, height, **kwargs):
    """A figure in the dashboard's style: light, no frame, no toolbar."""
    kwargs.setdefault("toolbar_location", None)
    fig = figure(
        title=title, height=height, sizing_mode="stretch_width",
        min_border_left=10, min_border_right=20, **kwargs,
    )
    fig.title.text_font_size = "13px"
    fig.title.text_color = "#333333"
    fig.outline_line_color = None
    fig.axis.axis_line_color = "#bbbbbb"
    fig.axis.major_tick_line_color = "#bbbbbb"
    fig.axis.minor_tick_line_color = None
    fig.axis.major_label_text_color = "#555555"
    fig.ygrid.grid_line_color = None
    fig.xgrid.grid_line_color = "#f0f0f0"
    return fig


def _local_offset_ms():
    """Milliseconds to add to a UTC time to read it as local time.

    Bokeh's datetime axis labels times in UTC; shifting the values makes it
    show the clock on the wall of the machine that runs the scheduler.
    """
    offset = datetime.datetime.now().astimezone().utcoffset()
    return offset.total_seconds() * 1000


# Text drawn over a bar, on a light patch so that it reads on any colour.
LABEL_STYLE = {
    "text_baseline": "middle", "text_font_size": "11px",
    "text_color": "#222222", "background_fill_color": "white",
    "background_fill_alpha": 0.75, "padding": 2,
}


# Task stream ---------------------------------------------------------------

class TaskStream:
    """One bar per finished task: a row per worker thread, time across."""

    columns = ("start", "stop", "row", "color", "key", "group", "worker",
               "duration", "status")

    def __init__(self, scheduler, colors):
        self.scheduler = scheduler
        self.colors = colors
        self.source = ColumnDataSource(
            {name: [] for name in self.columns}, name="task_stream"
        )
        self.rows = FactorRange(factors=[])
        self._row_keys = {}     # row label -> sort key
        self._labels = {}       # worker address -> label, kept after it left
        self._newest = None     # the newest record already sent
        self._rollover = (getattr(scheduler.task_stream, "maxlen", None)
                          or int(config.get("scheduler.task-stream-length")))
        self.figure = self._make_figure()

    def _make_figure(self):
        fig = _figure(
            "Task stream", 320, x_axis_type="datetime", y_range=self.rows,
            x_range=DataRange1d(follow="end",
                                follow_interval=TASK_STREAM_WINDOW_MS,
                                range_padding=0.02),
            tools="xpan,xwheel_zoom,reset", toolbar_location="above",
        )
        bars = fig.hbar(
            y="row", left="start", right="stop", height=0.8,
            fill_color="color", line_color="color", source=self.source,
        )
        fig.add_tools(HoverTool(renderers=[bars], tooltips=[
            ("task", "@key"), ("worker", "@worker"),
            ("duration", "@duration"), ("status", "@status"),
        ]))
        fig.toolbar.logo = None
        # Clock times only: the date would only repeat itself.
        fig.xaxis.formatter = DatetimeTickFormatter(
            milliseconds="%H:%M:%S.%3N", seconds="%H:%M:%S",
            minsec="%H:%M:%S", minutes="%H:%M", hourmin="%H:%M",
            hours="%H:%M", context=None,
        )
        return fig

    def update(self):
        records = self._new_records()
        if records:
            self.source.stream(self._to_columns(records), self._rollover)
        for label, worker in workers_in_order(self.scheduler):
            self._labels[worker.address] = label
            for thread in range(worker.nthreads):
                self._add_row(label, thread)
        set_factors(self.rows, sorted(self._row_keys,
                                      key=self._row_keys.__getitem__))

    def _new_records(self):
        """Return the records appended since the last update, oldest first.

        The stream is a bounded deque, so positions shift as old records
        fall off; the newest record seen is remembered by identity instead.
        If it has fallen off too, every record in the deque is new.
        """
        new = []
        for record in reversed(self.scheduler.task_stream):
            if record is self._newest:
                break
            new.append(record)
        if new:
            self._newest = new[0]
        new.reverse()
        return new

    def _to_columns(self, records):
        offset = _local_offset_ms()
        data = {name: [] for name in self.columns}
        for record in records:
            label = self._worker_label(record["worker"])
            row = self._add_row(label, record["thread"])
            error = record["status"] != "ok"
            data["start"].append(record["start"] * 1000 + offset)
            data["stop"].append(record["stop"] * 1000 + offset)
            data["row"].append(row)
            data["color"].append(ERROR_COLOR if error
                                 else self.colors(record["group"]))
            data["key"].append(str(record["key"]))
            data["group"].append(str(record["group"]))
            data["worker"].append(label)
            data["duration"].append(
                _format_duration(record["stop"] - record["start"]))
            data["status"].append(record["status"])
        return data

    def _worker_label(self, address):
        label = self._labels.get(address)
        if label is None:
            worker = self.scheduler.workers.get(address)
            label = worker_label(worker) if worker else address
            self._labels[address] = label
        return label

    def _add_row(self, label, thread):
        row = f"{label} #{thread}"
        self._row_keys.setdefault(row, (natural_key(label), thread))
        return row


def _format_duration(seconds):
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


# Progress ------------------------------------------------------------------

class Progress:
    """A bar per task group: in memory, processing, erred, still waiting."""

    states = {"waiting": 0, "processing": 1, "memory": 2, "erred": 3}
    columns = ("group", "color", "total", "waiting", "processing", "memory",
               "erred", "memory_end", "processing_end", "erred_end", "label")

    def __init__(self, scheduler, colors):
        self.scheduler = scheduler
        self.colors = colors
        self.source = ColumnDataSource(
            {name: [] for name in self.columns}, name="progress"
        )
        self.groups = FactorRange(factors=[], range_padding_units="absolute")
        self._counter = None
        self.figure = self._make_figure()

    def _make_figure(self):
        fig = _figure("Progress", 300, y_range=self.groups,
                      x_range=Range1d(0, 1.22))
        bar = {"y": "group", "height": 0.6, "source": self.source,
               "line_color": None}
        whole = fig.hbar(left=0, right=1, fill_color=WAITING_COLOR, **bar)
        fig.hbar(left=0, right="memory_end", fill_color="color", **bar)
        fig.hbar(left="memory_end", right="processing_end",
                 fill_color="color", fill_alpha=0.35, **bar)
        fig.hbar(left="processing_end", right="erred_end",
                 fill_color=ERROR_COLOR, **bar)
        fig.text(x=1.02, y="group", text="label", source=self.source,
                 text_baseline="middle", text_font_size="11px",
                 text_color="#444444")
        fig.add_tools(HoverTool(renderers=[whole], tooltips=[
            ("group", "@group"), ("in memory", "@memory"),
            ("processing", "@processing"), ("waiting", "@waiting"),
            ("erred", "@erred"),
        ]))
        fig.xaxis.visible = False
        fig.xgrid.grid_line_color = None
        return fig

    def update(self):
        # Counting walks every task: skip it when no task changed state.
        counter = self.scheduler.transition_counter
        if counter == self._counter:
            return
        self._counter = counter

        counts = self._count()
        groups = list(counts)[-MAX_PROGRESS_GROUPS:]
        data = {name: [] for name in self.columns}
        for group in groups:
            self._append_row(data, group, counts[group])
        # Categorical axes go bottom to top; the first group goes on top.
        set_factors(self.groups, groups[::-1])
        padding = max(MIN_PROGRESS_ROWS - len(groups), 0) / 2
        if self.groups.range_padding != padding:
            self.groups.range_padding = padding
        update_source(self.source, data)

    def _count(self):
        """Count each group's tasks by state, groups in order of arrival."""
        counts = {}
        for task in self.scheduler.tasks.values():
            index = self.states.get(task.state)
            if index is not None:  # released tasks are no one's work
                counts.setdefault(str(task.group), [0, 0, 0, 0])[index] += 1
        return counts

    def _append_row(self, data, group, counts):
        waiting, processing, memory, erred = counts
        total = sum(counts)
        data["group"].append(group)
        data["color"].append(self.colors(group))
        data["total"].append(total)
        data["waiting"].append(waiting)
        data["processing"].append(processing)
        data["memory"].append(memory)
        data["erred"].append(erred)
        data["memory_end"].append(memory / total)
        data["processing_end"].append((memory + processing) / total)
        data["erred_end"].append((memory + processing + erred) / total)
        label = f"{memory} / {total}"
        data["label"].append(f"{label}, {erred} erred" if erred else label)


# Worker charts -------------------------------------------------------------

class WorkerMemory:
    """Memory per worker: held data, process memory, and the limit."""

    columns = ("worker", "memory", "managed", "limit", "color", "label",
               "memory_text", "managed_text", "limit_text")

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.source = ColumnDataSource(
            {name: [] for name in self.columns}, name="worker_memory"
        )
        self.workers = FactorRange(factors=[])
        self._warn = float(config.get("worker.memory.warn"))
        self._terminate = float(config.get("worker.memory.terminate"))
        self.figure = self._make_figure()

    def _make_figure(self):
        fig = _figure("Memory per worker", 170, y_range=self.workers,
                      x_range=DataRange1d(start=0, range_padding=0.05))
        bar = {"y": "worker", "height": 0.7, "source": self.source}
        fig.hbar(left=0, right="limit", fill_color=None,
                 line_color="#999999", line_dash="dashed", **bar)
        process = fig.hbar(left=0, right="memory", fill_color="color",
                           fill_alpha=0.35, line_color=None, **bar)
        fig.hbar(left=0, right="managed", fill_color="color",
                 line_color=None, **bar)
        fig.text(x=0, y="worker", text="label", source=self.source,
                 x_offset=6, **LABEL_STYLE)
        fig.add_tools(HoverTool(renderers=[process], tooltips=[
            ("worker", "@worker"), ("process memory", "@memory_text"),
            ("held data", "@managed_text"), ("limit", "@limit_text"),
        ]))
        # Ticks at powers of two, so that they read 512 MiB, 1 GiB, 2 GiB.
        fig.xaxis.ticker = AdaptiveTicker(base=2, mantissas=[1],
                                          min_interval=2**20)
        fig.xaxis.formatter = NumeralTickFormatter(format="0.[0] ib")
        return fig

    def update(self):
        data = {name: [] for name in self.columns}
        for label, worker in workers_in_order(self.scheduler):
            self._append_row(data, label, worker)
        set_factors(self.workers, data["worker"][::-1])
        update_source(self.source, data)

    def _append_row(self, data, label, worker):
        memory = float(worker.metrics.get("memory") or 0)
        managed = float(worker.metrics.get("managed_bytes") or 0)
        limit = float(worker.memory_limit) if worker.memory_limit else math.nan
        data["worker"].append(label)
        data["memory"].append(memory)
        data["managed"].append(managed)
        data["limit"].append(limit)
        data["color"].append(self._color(memory, limit))
        data["memory_text"].append(format_bytes(memory))
        data["managed_text"].append(format_bytes(managed))
        if math.isnan(limit):
            data["limit_text"].append("none")
            data["label"].append(format_bytes(memory))
        else:
            data["limit_text"].append(format_bytes(limit))
            data["label"].append(
                f"{format_bytes(memory)} of {format_bytes(limit)}")

    def _color(self, memory, limit):
        """Blue while comfortable, orange past the warning, red near death."""
        fraction = memory / limit if limit > 0 else 0  # NaN compares False
        if fraction >= self._terminate:
            return ERROR_COLOR
        if fraction >= self._warn:
            return "#ff7f0e"
        return "#1f77b4"


class WorkerCPU:
    """CPU use per worker, out of 100% per thread."""

    columns = ("worker", "cpu", "label")

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.source = ColumnDataSource(
            {name: [] for name in self.columns}, name="worker_cpu"
        )
        self.workers = FactorRange(factors=[])
        self.scale = Range1d(0, 100)
        self.figure = self._make_figure()

    def _make_figure(self):
        fig = _figure("CPU per worker", 170, y_range=self.workers,
                      x_range=self.scale)
        fig.hbar(y="worker", left=0, right="cpu", height=0.7,
                 fill_color="#2ca02c", fill_alpha=0.7, line_color=None,
                 source=self.source)
        fig.text(x=0, y="worker", text="label", source=self.source,
                 x_offset=6, **LABEL_STYLE)
        fig.xaxis.formatter = PrintfTickFormatter(format="%d%%")
        return fig

    def update(self):
        data = {name: [] for name in self.columns}
        most_threads = 1
        for label, worker in workers_in_order(self.scheduler):
            cpu = float(worker.metrics.get("cpu") or 0)
            data["worker"].append(label)
            data["cpu"].append(cpu)
            data["label"].append(f"{cpu:.0f}%")
            most_threads = max(most_threads, worker.nthreads)
        set_factors(self.workers, data["worker"][::-1])
        if self.scale.end != 100 * most_threads:
            self.scale.end = 100 * most_threads
        update_source(self.source, data)


# Workers table -------------------------------------------------------------

class WorkerTable:
    """One row per worker, with a line of totals above it."""

    columns = (
        ("address", "address", None),
        ("name", "name", None),
        ("nthreads", "threads", None),
        ("memory", "memory", None),
        ("memory_limit", "memory limit", None),
        ("cpu", "CPU %", NumberFormatter(format="0")),
        ("executing", "running", None),
        ("processing", "processing", None),
        ("held", "held", None),
        ("heartbeat", "last heartbeat", None),
    )

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.source = ColumnDataSource(
            {field: [] for field, _, _ in self.columns}, name="workers"
        )
        self.summary = Div(text="")
        table = DataTable(
            source=self.source, columns=self._table_columns(),
            sizing_mode="stretch_width", height=420, index_position=None,
            reorderable=False,
        )
        self.layout = column(self.summary, table, sizing_mode="stretch_width")

    def _table_columns(self):
        columns = []
        for field, title, formatter in self.columns:
            extra = {"formatter": formatter} if formatter else {}
            columns.append(TableColumn(field=field, title=title, **extra))
        return columns

    def update(self):
        now = time.time()
        data = {field: [] for field, _, _ in self.columns}
        for label, worker in workers_in_order(self.scheduler):
            self._append_row(data, label, worker, now)
        update_source(self.source, data)

        summary = self._summary()
        if self.summary.text != summary:
            self.summary.text = summary

    def _append_row(self, data, label, worker, now):
        metrics = worker.metrics
        limit = worker.memory_limit
        data["address"].append(worker.address)
        data["name"].append(label)
        data["nthreads"].append(worker.nthreads)
        data["memory"].append(format_bytes(metrics.get("memory") or 0))
        data["memory_limit"].append(format_bytes(limit) if limit else "none")
        data["cpu"].append(float(metrics.get("cpu") or 0))
        data["executing"].append(int(metrics.get("executing") or 0))
        data["processing"].append(len(worker.processing))
        data["held"].append(len(worker.has_what))
        data["heartbeat"].append(f"{max(now - worker.last_seen, 0):.1f} s ago")

    def _summary(self):
        workers = list(self.scheduler.workers.values())
        threads = sum(w.nthreads for w in workers)
        limits = [w.memory_limit for w in workers if w.memory_limit]
        memory = (f", {format_bytes(sum(limits))} memory limit"
                  if limits else "")
        plural = "" if len(workers) == 1 else "s"
        return (f"<b>{len(workers)} worker{plural}</b>, {threads} threads"
                f"{memory}")
