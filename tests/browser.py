"""Drive the dashboard in a real headless Chromium, for the browser tests.

Playwright controls Debian's ``/usr/bin/chromium`` (the ``chromium``
package); Playwright's own browser builds are never used, so nothing is
downloaded. ``open_page()`` gives a ``Watched`` page that records what a
person at the browser would notice: console errors, uncaught exceptions
and the dashboard's websockets with the messages they receive.

The functions after it read BokehJS's state from the page: whether the
document has rendered, and how many rows a named data source holds.
"""

import contextlib
import json
import logging
import os
import time

logger = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}


def chromium_missing():
    """Why the browser tests cannot run here, or None if they can."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is missing: pip install playwright"
    return None


class Watched:
    """A Playwright page and what happened on it so far."""

    def __init__(self, page):
        self.page = page
        self.errors = []        # console errors and uncaught exceptions
        self.websockets = []    # URLs of websockets the page opened
        self.frames = 0         # websocket messages the page received
        self.texts = []         # the text ones among them, in order
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"{exc}"))
        page.on("websocket", self._on_websocket)

    def _on_console(self, message):
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _on_websocket(self, websocket):
        self.websockets.append(websocket.url)
        websocket.on("framereceived", self._on_frame)

    def _on_frame(self, payload):
        self.frames += 1
        if isinstance(payload, str):
            self.texts.append(payload)


@contextlib.contextmanager
def open_page():
    """Start Chromium and yield a ``Watched`` page; close both after."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            yield Watched(page)
        finally:
            browser.close()


def wait_for_bokeh(watched, timeout=30):
    """Wait until BokehJS has built and drawn every root of the document."""
    watched.page.wait_for_function(
        """() => window.Bokeh !== undefined
                 && Bokeh.documents.length > 0
                 && Bokeh.index.roots.length > 0
                 && Bokeh.documents[0].is_idle""",
        timeout=timeout * 1000,
    )


def source_length(watched, name):
    """Rows in the data source called ``name`` of the page's document."""
    return watched.page.evaluate(
        """(name) => {
               const source = Bokeh.documents[0].get_model_by_name(name);
               return source === null ? -1 : source.get_length();
           }""",
        name,
    )


def source_column(watched, name, column):
    """One column of the data source called ``name``, as a list."""
    return watched.page.evaluate(
        """([name, column]) => Array.from(
               Bokeh.documents[0].get_model_by_name(name).data[column])""",
        [name, column],
    )


def model_id(watched, name):
    """The id of the model called ``name``, as it appears in messages."""
    return watched.page.evaluate(
        "(name) => Bokeh.documents[0].get_model_by_name(name).id", name)


def document_events(watched, since=0):
    """(kind, model id, attribute) of each change the server pushed.

    Bokeh sends each change to a document as a PATCH-DOC message whose
    JSON content lists events such as ``ColumnsStreamed`` (rows added to a
    data source), ``ColumnsPatched`` (cells changed) or ``ModelChanged``
    (a property replaced). ``since`` skips the first text frames.
    """
    events = []
    for text in watched.texts[since:]:
        try:
            content = json.loads(text)
        except ValueError:
            continue
        if not isinstance(content, dict):
            continue
        for event in content.get("events", []):
            model = event.get("model") or {}
            events.append((event.get("kind"), model.get("id"),
                           event.get("attr")))
    return events


def wait_until(watched, condition, what, timeout=30, interval=0.1):
    """Poll ``condition()`` until it is true; fail naming ``what``.

    Waits with Playwright's own timer rather than ``time.sleep``: the page's
    events (console lines, websocket frames) are only delivered to
    ``Watched`` while a Playwright call is running.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout} s")
        watched.page.wait_for_timeout(interval * 1000)
