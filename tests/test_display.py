"""Tests for minidask.display: the HTML and text views, Logs and progress.

The views are functions over plain dicts, so these tests build the dicts a
cluster and a client would hand over.  The progress bar is tested against
a small stand-in future that finishes from another thread, as a real one
does when the scheduler reports back.
"""

import re
import threading
import time

import pytest

from minidask.display import (
    Logs,
    client_html,
    client_text,
    cluster_html,
    cluster_text,
    future_html,
    future_text,
    progress,
)

GiB = 2**30


def worker_info(port, name, nthreads=1, memory_limit=GiB, nanny=True):
    address = f"tcp://127.0.0.1:{port}"
    return address, {
        "address": address,
        "name": name,
        "nthreads": nthreads,
        "memory_limit": memory_limit,
        "host": "127.0.0.1",
        "nanny": f"tcp://127.0.0.1:{port - 1}" if nanny else None,
        "last_seen": time.time() - 5,
        "metrics": {
            "cpu": 42.0,
            "memory": 256 * 2**20,
            "managed_bytes": 4096,
            "executing": 1,
            "in_memory": 7,
        },
    }


def cluster_info(workers=None, **changes):
    if workers is None:
        workers = dict([
            worker_info(40201, 0, nthreads=1, memory_limit=GiB),
            worker_info(40203, 1, nthreads=2, memory_limit=2 * GiB),
        ])
    info = {
        "type": "LocalCluster",
        "name": "a1b2c3",
        "status": "running",
        "scheduler_address": "tcp://127.0.0.1:40123",
        "dashboard_link": "http://127.0.0.1:8787/status",
        "workers": workers,
    }
    info.update(changes)
    return info


def client_info(cluster=None, **changes):
    workers = (cluster or cluster_info())["workers"]
    info = {
        "id": "Client-5e1f",
        "status": "running",
        "scheduler_address": "tcp://127.0.0.1:40123",
        "dashboard_link": "http://127.0.0.1:8787/status",
        "cluster": cluster,
        "workers": workers,
    }
    info.update(changes)
    return info


def cell_after(html, label):
    """The text of the table cell that follows the cell holding `label`."""
    match = re.search(rf">{label}</td>\s*<td[^>]*>(.*?)</td>", html, re.S)
    assert match, f"no {label!r} cell in the HTML"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


# -- clusters -----------------------------------------------------------------


def test_cluster_html_shows_the_key_fields():
    html = cluster_html(cluster_info())

    assert "LocalCluster" in html and "a1b2c3" in html
    assert "running" in cell_after(html, "Status")
    assert cell_after(html, "Scheduler") == "tcp://127.0.0.1:40123"
    assert cell_after(html, "Workers") == "2"
    assert cell_after(html, "Threads") == "3"
    assert cell_after(html, "Memory") == "3.00 GiB"
    assert '<a href="http://127.0.0.1:8787/status"' in html


def test_cluster_html_lists_each_worker_in_a_collapsible_section():
    html = cluster_html(cluster_info())

    assert "<details" in html and "Workers (2)" in html
    assert html.count("<tr>") == 2  # one body row per worker
    for address in ("tcp://127.0.0.1:40201", "tcp://127.0.0.1:40203"):
        assert address in html
    assert "nanny tcp://127.0.0.1:40200" in html
    assert "256.00 MiB / 1.00 GiB" in html
    assert "42%" in html
    assert "5 s ago" in html


def test_cluster_html_escapes_worker_names_and_cluster_names():
    workers = dict([worker_info(40201, "<script>alert(1)</script>")])
    html = cluster_html(cluster_info(workers=workers, name="<b>x</b>"))

    assert "<script>" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html


def test_cluster_html_without_dashboard_or_memory_limit():
    workers = dict([worker_info(40201, 0, memory_limit=None)])
    html = cluster_html(cluster_info(workers=workers, dashboard_link=None))

    assert "<a " not in html
    assert cell_after(html, "Dashboard") == "not available"
    assert cell_after(html, "Memory") == "no limit"


def test_only_web_addresses_become_links():
    html = cluster_html(cluster_info(dashboard_link="javascript:alert(1)"))

    assert "href" not in html
    assert cell_after(html, "Dashboard") == "javascript:alert(1)"


def test_cluster_html_with_no_workers_yet():
    html = cluster_html(cluster_info(workers={}, status="starting"))

    assert cell_after(html, "Workers") == "0"
    assert "No workers yet." in html


def test_cluster_html_uses_inline_styles_only():
    html = cluster_html(cluster_info())

    # Jupyter strips <style> and <script> from untrusted notebooks' outputs.
    assert "<style" not in html and "<script" not in html
    assert "var(--jp-" in html


def test_cluster_text():
    assert cluster_text(cluster_info()) == (
        "LocalCluster(a1b2c3, 'tcp://127.0.0.1:40123', workers=2, "
        "threads=3, memory=3.00 GiB)"
    )


def test_cluster_text_names_a_status_other_than_running():
    text = cluster_text(cluster_info(workers={}, status="closed"))

    assert text == (
        "LocalCluster(a1b2c3, 'tcp://127.0.0.1:40123', workers=0, "
        "threads=0, memory=0 B, status=closed)"
    )


# -- clients ------------------------------------------------------------------


def test_client_html_with_its_cluster():
    html = client_html(client_info(cluster=cluster_info()))

    assert "Client-5e1f" in html
    assert cell_after(html, "Scheduler") == "tcp://127.0.0.1:40123"
    assert cell_after(html, "Workers") == "2"
    assert cell_after(html, "Threads") == "3"
    assert cell_after(html, "Memory") == "3.00 GiB"
    assert cell_after(html, "Connected to") == "LocalCluster object"
    assert "Cluster: LocalCluster" in html
    assert html.count("<details") == 2  # the cluster, and its workers
    assert '<a href="http://127.0.0.1:8787/status"' in html


def test_client_html_connected_by_address_lists_workers():
    html = client_html(client_info(cluster=None))

    assert cell_after(html, "Connected to") == "a scheduler address"
    assert "Cluster:" not in html
    assert "Workers (2)" in html


def test_client_html_escapes():
    workers = dict([worker_info(40201, "<script>")])
    html = client_html(client_info(workers=workers, id="<i>c</i>"))

    assert "<script>" not in html and "<i>c</i>" not in html
    assert "&lt;script&gt;" in html and "&lt;i&gt;c&lt;/i&gt;" in html


def test_client_text():
    assert client_text(client_info()) == (
        "<Client: 'tcp://127.0.0.1:40123' workers=2, threads=3, "
        "memory=3.00 GiB>"
    )
    assert client_text(client_info(status="closed")) == (
        "<Client: 'tcp://127.0.0.1:40123' closed>"
    )
    assert client_text(client_info(scheduler_address=None)) == (
        "<Client: not connected>"
    )


# -- futures ------------------------------------------------------------------


def test_future_text():
    assert future_text("inc-8f1d", "finished", "int") == (
        "<Future: finished, type: int, key: inc-8f1d>"
    )
    assert future_text("inc-8f1d", "pending") == (
        "<Future: pending, key: inc-8f1d>"
    )


@pytest.mark.parametrize(
    "status", ["pending", "finished", "error", "cancelled", "lost"]
)
def test_future_html_colours_each_status_its_own_way(status):
    html = future_html("inc-8f1d", status, "int")

    assert "inc-8f1d" in html and "int" in html
    assert re.search(rf'style="color: #[0-9a-f]{{6}}[^"]*">{status}<', html)


def test_future_html_status_colours_differ():
    colour = {}
    for status in ["pending", "finished", "error", "cancelled", "lost"]:
        html = future_html("k", status)
        colour[status] = re.search(rf"color: (#\w+)[^>]*>{status}<", html)[1]
    assert len(set(colour.values())) == 5


def test_future_html_escapes_the_key():
    html = future_html("<img src=x>", "finished")

    assert "<img" not in html and "&lt;img src=x&gt;" in html


# -- logs ---------------------------------------------------------------------

SCHEDULER_LOG = "\n".join([
    "2026-12-03 10:05:09,001 - minidask.scheduler - ERROR - task div-1 failed",
    "Traceback (most recent call last):",
    "ZeroDivisionError: division by zero",
    "2026-12-03 10:05:08,002 - minidask.scheduler - WARNING - worker lost",
    "2026-12-03 10:05:07,003 - minidask.scheduler - INFO - ERROR is a word",
    "2026-12-03 10:05:06,004 - minidask.scheduler - CRITICAL - out of disk",
])


def sample_logs():
    return Logs({
        "Cluster": "2026-12-03 10:05:04,123 - minidask.deploy - INFO - up",
        "Scheduler": SCHEDULER_LOG,
        "tcp://127.0.0.1:40201": "",
    })


def html_lines(html):
    """(style, text) of every log line in a Logs HTML view."""
    return re.findall(r'<div style="([^"]*)">([^<]*)</div>', html)


def test_logs_html_has_one_collapsible_section_per_source():
    html = sample_logs()._repr_html_()

    assert html.count("<details") == 3
    for source in ("Cluster", "Scheduler", "tcp://127.0.0.1:40201"):
        assert re.search(rf"<summary[^>]*>\s*{re.escape(source)}\b", html)
    assert "No log lines." in html


def test_logs_html_colours_warnings_amber_and_errors_red():
    lines = dict(
        (text, style) for style, text in html_lines(sample_logs()._repr_html_())
    )
    amber, red = "color: #cf8a00", "color: #e0453a"

    assert lines[SCHEDULER_LOG.splitlines()[0]].startswith(red)
    assert lines["Traceback (most recent call last):"].startswith(red)
    assert lines[SCHEDULER_LOG.splitlines()[3]].startswith(amber)
    # The level is the first level word, not any word in the message.
    assert "color" not in lines[SCHEDULER_LOG.splitlines()[4]]
    assert lines[SCHEDULER_LOG.splitlines()[5]].startswith(red)
    assert "font-weight: 600" in lines[SCHEDULER_LOG.splitlines()[5]]


def test_logs_html_counts_warnings_and_errors_per_source():
    html = sample_logs()._repr_html_()

    assert re.search(r"6\s+lines", html)
    assert re.search(r"1\s+warning<", html)
    assert re.search(r"2\s+errors<", html)


def test_logs_html_is_monospaced_scrolling_and_escaped():
    logs = Logs({"Scheduler": "INFO - <script>alert(1)</script>"})
    html = logs._repr_html_()

    assert "monospace" in html and "max-height" in html
    assert "overflow: auto" in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_logs_is_a_dict_with_a_readable_repr():
    logs = sample_logs()
    text = repr(logs)

    assert logs["Cluster"].endswith("INFO - up")
    assert text.startswith("Logs({\n") and text.endswith("\n})")
    assert "    'Scheduler':\n        2026-12-03 10:05:09,001" in text
    assert "    'tcp://127.0.0.1:40201': ''," in text
    assert repr(Logs()) == "Logs({})"


def test_logs_from_records_keeps_newest_first():
    records = {
        "Scheduler": [
            ("WARNING", "2026-12-03 10:00:02 - s - WARNING - newest"),
            ("INFO", "2026-12-03 10:00:01 - s - INFO - oldest"),
        ],
        "tcp://127.0.0.1:40201": [("ERROR", "plain message")],
    }
    logs = Logs.from_records(records)

    assert isinstance(logs, Logs)
    assert list(logs) == ["Scheduler", "tcp://127.0.0.1:40201"]
    assert logs["Scheduler"].splitlines() == [
        "2026-12-03 10:00:02 - s - WARNING - newest",
        "2026-12-03 10:00:01 - s - INFO - oldest",
    ]
    # A message without its level word gets it, so it can be coloured.
    assert logs["tcp://127.0.0.1:40201"] == "ERROR - plain message"


def test_logs_from_records_in_logging_order_reverses():
    records = {"Cluster": [("INFO", "INFO - first"), ("INFO", "INFO - last")]}
    logs = Logs.from_records(records, newest_first=False)

    assert logs["Cluster"].splitlines() == ["INFO - last", "INFO - first"]


# -- progress -----------------------------------------------------------------


class StandInFuture:
    """Just enough of a future for progress(): done, callbacks, status."""

    def __init__(self, status="pending"):
        self.status = status
        self._callbacks = []
        self._lock = threading.Lock()

    def done(self):
        return self.status != "pending"

    def add_done_callback(self, fn):
        with self._lock:
            if not self.done():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, status="finished"):
        with self._lock:
            self.status = status
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


def run_progress(futures, **kwargs):
    """Run progress() in a thread; fail rather than hang if it never ends."""
    errors = []

    def target():
        try:
            progress(futures, **kwargs)
        except BaseException as exc:  # reported in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def finish_later(futures, statuses, delay=0.05):
    """Finish `futures` one by one from another thread."""
    def target():
        for future, status in zip(futures, statuses):
            time.sleep(delay)
            future.finish(status)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_progress_completes_as_futures_finish_in_another_thread(capsys):
    futures = [StandInFuture() for _ in range(4)]
    thread, errors = run_progress(futures, notebook=False)

    time.sleep(0.2)
    assert thread.is_alive(), "progress() returned before the futures ended"
    finish_later(futures, ["finished", "error", "finished", "cancelled"])
    thread.join(timeout=10)

    assert not thread.is_alive(), "progress() did not return"
    assert not errors
    output = capsys.readouterr().err
    assert "4/4" in output
    assert "errors=1" in output and "cancelled=1" in output


def test_progress_accepts_nested_structures_and_counts_each_future_once(
    capsys,
):
    a, b, c = StandInFuture(), StandInFuture(), StandInFuture()
    thread, errors = run_progress(
        {"x": [a, (b, a)], "y": {"z": c}}, notebook=False
    )
    finish_later([a, b, c], ["finished"] * 3)
    thread.join(timeout=10)

    assert not thread.is_alive() and not errors
    assert "3/3" in capsys.readouterr().err


def test_progress_of_one_future_and_of_finished_ones(capsys):
    assert progress(StandInFuture("finished"), notebook=False) is None
    assert "1/1" in capsys.readouterr().err

    done = [StandInFuture("finished"), StandInFuture("error")]
    assert progress(done, notebook=False) is None
    assert "errors=1" in capsys.readouterr().err

    assert progress([], notebook=False) is None


def test_progress_rejects_what_is_not_a_future():
    with pytest.raises(TypeError, match="progress.*got 3 of type int"):
        progress([StandInFuture("finished"), 3])


def test_progress_draws_a_notebook_widget_when_asked():
    pytest.importorskip("ipywidgets")
    futures = [StandInFuture() for _ in range(2)]
    thread, errors = run_progress(futures, notebook=True)
    finish_later(futures, ["finished", "finished"])
    thread.join(timeout=10)

    assert not thread.is_alive() and not errors
