"""The dashboard, tested against a real cluster: over HTTP and in Chromium.

Every test talks to a real ``LocalCluster`` with two workers, whose
scheduler serves the dashboard on a free port of 127.0.0.1. The HTTP tests
fetch each page with urllib; the component tests build a chart on the
scheduler's own event loop and watch which changes it sends; the browser
tests open the pages in headless Chromium (see ``browser.py``), one of
them through a real Jupyter server with jupyter-server-proxy, as a learner
on Binder would.
"""

import asyncio
import json
import logging
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlparse

import pytest
from bokeh.document import Document
from bokeh.document.events import (
    ColumnDataChangedEvent, ColumnsPatchedEvent, ColumnsStreamedEvent,
)
from bokeh.models import ColumnDataSource
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

import browser
import minidask
from minidask.dashboard import parse_address
from minidask.dashboard.components import (
    GroupColors, Progress, TaskStream, update_source,
)
from minidask.dashboard.documents import refresh
from minidask.loop import sync

BROWSER_MISSING = browser.chromium_missing()


def needs_browser(test):
    """Mark ``test`` as a browser test, skipped (saying why) without one."""
    test = pytest.mark.browser(test)
    return pytest.mark.skipif(BROWSER_MISSING is not None,
                              reason=str(BROWSER_MISSING))(test)


def make_task(name, delay=0.0):
    """A task function called ``name`` (its task group) that sleeps.

    Defined inside a function so that cloudpickle sends it by value: the
    worker processes cannot import this test module.
    """
    def task(x):
        time.sleep(delay)
        return x + 1
    task.__name__ = task.__qualname__ = name
    return task


def on_loop(function):
    """Call ``function()`` on minidask's event loop, where the scheduler
    runs, so that it sees the scheduler's state between two changes."""
    async def call():
        return function()
    return sync(call(), timeout=30)


# Fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with minidask.LocalCluster(n_workers=2,
                               dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with minidask.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        yield client


@pytest.fixture(scope="module")
def base_url(cluster, client):
    """``http://127.0.0.1:PORT/``, the dashboard's root."""
    link = cluster.dashboard_link
    assert link.endswith("/status"), link
    return link[:-len("status")]


# HTTP helpers ----------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url, follow_redirects=True):
    """GET ``url``; return (status, headers, body as text)."""
    handlers = [] if follow_redirects else [_NoRedirect]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def script_sources(html):
    return re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)


def links(html):
    return re.findall(r'<a [^>]*href="([^"]+)"', html)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RecordsHandler(logging.Handler):
    """Keep the log records of one logger, for asserting on them."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.records = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


# Pages over HTTP -------------------------------------------------------------

def test_health_is_plain_ok(base_url):
    status, headers, body = fetch(base_url + "health")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body == "ok"


def test_root_redirects_to_status_relatively(base_url):
    status, headers, _ = fetch(base_url, follow_redirects=False)
    assert status == 302
    # Relative, so that it keeps a proxy's prefix.
    assert headers["Location"] == "status"


@pytest.mark.parametrize("page", ["status", "workers"])
def test_bokeh_pages_load_bokeh_from_the_dashboard(base_url, page):
    status, headers, html = fetch(base_url + page)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "Bokeh.embed.embed_items" in html

    sources = script_sources(html)
    assert any("bokeh.min.js" in src for src in sources), sources
    for src in sources:
        # Relative to the page: no CDN, no host, no leading slash.
        assert not urlparse(src).netloc and not src.startswith("/"), src
        url = urljoin(base_url + page, src)
        assert urlparse(url).path.startswith("/static/js/"), url
        script_status, _, script = fetch(url)
        assert script_status == 200 and len(script) > 1000, url

    assert {"status", "workers", "logs"} <= set(links(html))


def test_status_with_a_trailing_slash_links_correctly(base_url):
    url = base_url + "status/"
    status, _, html = fetch(url)
    assert status == 200
    for src in script_sources(html):
        assert fetch(urljoin(url, src))[0] == 200, src
    targets = {urljoin(url, href) for href in links(html)}
    assert {base_url + page for page in ("status", "workers", "logs")} \
        <= targets


def test_identity_names_scheduler_workers_and_version(base_url, cluster):
    status, headers, body = fetch(base_url + "json/identity.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    identity = json.loads(body)
    assert identity["address"] == cluster.scheduler_address
    assert identity["version"] == minidask.__version__
    assert len(identity["workers"]) == 2


def test_logs_page_shows_scheduler_and_every_worker(base_url, cluster):
    status, headers, html = fetch(base_url + "logs?n=50")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "<h2>Scheduler" in html
    assert cluster.scheduler_address in html
    for address in on_loop(lambda: list(cluster.scheduler.workers)):
        assert address in html
    assert "status" in links(html)


def test_logs_page_refuses_a_bad_line_count(base_url):
    status, _, _ = fetch(base_url + "logs?n=many")
    assert status == 400


def test_websocket_from_another_site_is_refused(base_url):
    url = base_url.replace("http://", "ws://") + "status/ws"
    request = HTTPRequest(url, headers={"Origin": "http://evil.example"})

    async def connect():
        return await websocket_connect(request)

    with pytest.raises(HTTPClientError) as refused:
        asyncio.run(connect())
    assert refused.value.code == 403


@pytest.mark.parametrize("path", ["nothing", "no/such/page"])
def test_unknown_path_is_404_linking_back_to_status(base_url, path):
    url = base_url + path
    status, headers, html = fetch(url)
    assert status == 404
    assert headers["Content-Type"].startswith("text/html")
    targets = {urljoin(url, href) for href in links(html)}
    assert base_url + "status" in targets


def test_taken_port_moves_with_one_warning_and_stop_frees_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        scheduler = minidask.Scheduler(
            dashboard_address=f"127.0.0.1:{port}", write_secret=False)
        with RecordsHandler("minidask.dashboard.server") as log:
            sync(scheduler.start(), timeout=30)
        try:
            moved = scheduler.dashboard.port
            assert moved != port
            warnings = [r for r in log.records
                        if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            message = warnings[0].getMessage()
            assert str(port) in message and str(moved) in message
            assert fetch(f"http://127.0.0.1:{moved}/health")[2] == "ok"
        finally:
            sync(scheduler.close(), timeout=30)

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", moved), timeout=5).close()


@pytest.mark.parametrize("address, expected", [
    (":8787", ("127.0.0.1", 8787)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("0.0.0.0:8787", ("0.0.0.0", 8787)),
    ("[::1]:8787", ("::1", 8787)),
    ("8787", ("127.0.0.1", 8787)),
    (8787, ("127.0.0.1", 8787)),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["localhost", "host:port", ":99999"])
def test_parse_address_names_the_bad_address_and_the_forms(address):
    with pytest.raises(ValueError, match=r"is not host:port.*':8787'"):
        parse_address(address)


# What each update sends ------------------------------------------------------

def watch_events(*models):
    """A document holding ``models``, and the list its changes go to."""
    doc = Document()
    for model in models:
        doc.add_root(model)
    events = []
    doc.on_change(events.append)
    return doc, events


def test_update_source_sends_only_the_changed_cells():
    source = ColumnDataSource({"a": [1, 2], "b": ["x", "y"],
                               "limit": [math.nan, 4.0]})
    _, events = watch_events(source)

    update_source(source, {"a": [1, 2], "b": ["x", "y"],
                           "limit": [math.nan, 4.0]})
    assert events == []

    update_source(source, {"a": [1, 5], "b": ["x", "y"],
                           "limit": [math.nan, 4.0]})
    assert len(events) == 1 and isinstance(events[0], ColumnsPatchedEvent)
    assert dict(events[0].patches) == {"a": [(1, 5)]}

    update_source(source, {"a": [1, 5, 6], "b": ["x", "y", "z"],
                           "limit": [1.0, 2.0, 3.0]})
    assert len(events) == 2 and isinstance(events[1], ColumnDataChangedEvent)
    assert source.data["b"] == ["x", "y", "z"]


def changes_to(events, model):
    """The events among ``events`` that change ``model``."""
    return [e for e in events if getattr(e, "model", None) is model]


def test_task_stream_streams_each_finished_task_once(cluster, client):
    client.gather(client.map(make_task("stream_one"), range(20)))

    stream = on_loop(lambda: TaskStream(cluster.scheduler, GroupColors()))
    _, events = watch_events(stream.figure)
    on_loop(stream.update)
    known = len(stream.source.data["key"])
    assert known >= 20
    first = changes_to(events, stream.source)
    assert [type(event) for event in first] == [ColumnsStreamedEvent]

    on_loop(stream.update)
    assert changes_to(events, stream.source) == first, \
        "nothing new finished: nothing to send"

    client.gather(client.map(make_task("stream_two"), range(10)))
    on_loop(stream.update)
    sent = changes_to(events, stream.source)
    assert [type(event) for event in sent] == [ColumnsStreamedEvent] * 2
    assert sent[1].data["group"] == ["stream_two"] * 10
    assert len(stream.source.data["key"]) == known + 10


def test_progress_counts_states_and_skips_when_nothing_changed(
        cluster, client):
    futures = client.map(make_task("progress_one"), range(12))
    client.gather(futures)

    progress = on_loop(lambda: Progress(cluster.scheduler, GroupColors()))
    _, events = watch_events(progress.figure)
    on_loop(progress.update)
    data = progress.source.data
    row = data["group"].index("progress_one")
    assert data["memory"][row] == data["total"][row] == 12
    assert data["label"][row] == "12 / 12"

    sent = len(events)
    on_loop(progress.update)
    assert len(events) == sent, "no task changed state: nothing to send"
    del futures


def test_refresh_does_nothing_for_a_page_nobody_watches(cluster, client):
    client.gather(client.map(make_task("unwatched"), range(5)))
    stream = on_loop(lambda: TaskStream(cluster.scheduler, GroupColors()))
    doc, events = watch_events(stream.figure)

    # A document with no session, like one whose tab has closed.
    on_loop(lambda: refresh(doc, [stream]))
    assert events == [] and stream.source.data["key"] == []


# In a browser ----------------------------------------------------------------

def events_for(watched, name, since=0):
    """Kinds of the changes pushed to the data source called ``name``."""
    target = browser.model_id(watched, name)
    return [kind for kind, model, _ in browser.document_events(watched, since)
            if model == target]


def row_of(watched, source, group):
    """The progress row of ``group`` as a dict, or None."""
    groups = browser.source_column(watched, source, "group")
    if group not in groups:
        return None
    index = groups.index(group)
    return {column: browser.source_column(watched, source, column)[index]
            for column in ("memory", "total", "erred")}


@needs_browser
def test_status_page_renders_and_updates_live(client, base_url, tmp_path):
    with browser.open_page() as watched:
        watched.page.goto(base_url + "status")
        browser.wait_for_bokeh(watched)
        ws_url = base_url.replace("http://", "ws://") + "status/ws"
        browser.wait_until(watched, lambda: watched.websockets == [ws_url],
                           f"websocket {ws_url} opened")

        before = browser.source_length(watched, "task_stream")
        groups = browser.source_column(watched, "progress", "group")
        assert "slow_inc" not in groups
        frames_before = len(watched.texts)
        futures = client.map(make_task("slow_inc", 0.01), range(300))
        lengths, done = set(), set()
        while not all(future.done() for future in futures):
            lengths.add(browser.source_length(watched, "task_stream"))
            row = row_of(watched, "progress", "slow_inc")
            done.add(row and row["memory"])
            watched.page.wait_for_timeout(50)
        browser.wait_until(
            watched,
            lambda: browser.source_length(watched, "task_stream")
            >= before + 300,
            "all 300 tasks drawn in the task stream",
        )
        progress = browser.wait_until(
            watched,
            lambda: (row := row_of(watched, "progress", "slow_inc"))
            and row["memory"] == 300 and row,
            "progress shows 300 slow_inc tasks in memory",
        )
        watched.page.screenshot(path=str(tmp_path / "status.png"))

        during = {n for n in lengths if before < n < before + 300}
        assert during, f"the task stream only jumped: {sorted(lengths)}"
        assert progress == {"memory": 300, "total": 300, "erred": 0}
        assert any(n and 0 < n < 300 for n in done), \
            f"progress only jumped: {done}"

        kinds = events_for(watched, "task_stream", since=frames_before)
        assert "ColumnsStreamed" in kinds
        assert set(kinds) == {"ColumnsStreamed"}, kinds
        assert watched.errors == []
        del futures


@needs_browser
def test_workers_page_lists_every_worker(cluster, client, base_url, tmp_path):
    with browser.open_page() as watched:
        watched.page.goto(base_url + "workers")
        browser.wait_for_bokeh(watched)
        addresses = on_loop(lambda: sorted(cluster.scheduler.workers))
        browser.wait_until(
            watched,
            lambda: sorted(browser.source_column(
                watched, "workers", "address")) == addresses,
            "the table lists every worker",
        )
        watched.page.screenshot(path=str(tmp_path / "workers.png"))
        assert watched.errors == []


@needs_browser
def test_stopping_with_a_page_open_ends_its_session_cleanly():
    scheduler = minidask.Scheduler(dashboard_address="127.0.0.1:0",
                                   write_secret=False)
    sync(scheduler.start(), timeout=30)
    dashboard = scheduler.dashboard
    with RecordsHandler("") as root_log, \
            RecordsHandler("minidask") as minidask_log:
        try:
            with browser.open_page() as watched:
                watched.page.goto(f"http://127.0.0.1:{dashboard.port}/status")
                browser.wait_for_bokeh(watched)
                sync(scheduler.close(), timeout=30)
                watched.page.wait_for_timeout(500)
        finally:
            sync(scheduler.close(), timeout=30)

    errors = [r.getMessage() for r in root_log.records + minidask_log.records
              if r.levelno >= logging.ERROR]
    assert errors == []
    assert on_loop(dashboard.sessions) == []


@needs_browser
def test_closing_the_page_ends_its_session_and_its_updates(cluster, client,
                                                          base_url):
    dashboard = on_loop(lambda: cluster.scheduler.dashboard)
    with browser.open_page() as watched:
        watched.page.goto(base_url + "status")
        browser.wait_for_bokeh(watched)
        assert len(on_loop(dashboard.sessions)) >= 1

    # Bokeh drops a session a few seconds after its websocket closed; the
    # periodic updates live on the session and go with it.
    deadline = time.monotonic() + 30
    while on_loop(dashboard.sessions) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert on_loop(dashboard.sessions) == []


# Through jupyter-server-proxy ------------------------------------------------

JUPYTER_BASE = "/user/learner/"


@pytest.fixture
def jupyter_server(tmp_path):
    """A real Jupyter server with jupyter-server-proxy, as on a hub.

    It has its own HOME, config, data and runtime folders, a token, and
    the base URL a JupyterHub gives a user's server.
    """
    home = tmp_path / "jupyter-home"
    home.mkdir()
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HOME=str(home),
               JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    command = [
        sys.executable, "-m", "jupyter_server", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", f"--ServerApp.token={token}",
        "--ServerApp.open_browser=False", f"--ServerApp.root_dir={home}",
        f"--ServerApp.base_url={JUPYTER_BASE}",
        "--ServerApp.jpserver_extensions={'jupyter_server_proxy': True}",
    ]
    log_path = tmp_path / "jupyter.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}{JUPYTER_BASE}"
    try:
        _wait_for_jupyter(process, f"{base}api/status?token={token}",
                          log_path)
        yield base, token
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_jupyter(process, url, log_path, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"jupyter server exited with {process.returncode}:\n"
                f"{log_path.read_text()}")
        try:
            if fetch(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"jupyter server did not answer {url} within "
                         f"{timeout} s:\n{log_path.read_text()}")


@needs_browser
def test_status_page_through_jupyter_server_proxy(
        cluster, client, jupyter_server, tmp_path):
    base, token = jupyter_server
    port = cluster.dashboard_port
    page_url = f"{base}proxy/{port}/status?token={token}"

    # Plain HTTP through the proxy first: the failure message is clearer.
    assert fetch(f"{base}proxy/{port}/health?token={token}")[2] == "ok"

    with browser.open_page() as watched:
        watched.page.goto(page_url)
        browser.wait_for_bokeh(watched)
        proxied_ws = (base.replace("http://", "ws://")
                      + f"proxy/{port}/status/ws")
        browser.wait_until(
            watched,
            lambda: any(url.startswith(proxied_ws)
                        for url in watched.websockets),
            f"websocket opened through the proxy at {proxied_ws}",
        )

        before = browser.source_length(watched, "task_stream")
        futures = client.map(make_task("proxied_inc", 0.005), range(100))
        client.gather(futures)
        browser.wait_until(
            watched,
            lambda: browser.source_length(watched, "task_stream")
            >= before + 100,
            "the 100 proxied tasks drawn in the task stream",
        )
        watched.page.screenshot(path=str(tmp_path / "proxied-status.png"))
        assert watched.errors == []
        del futures
