"""The first notebook, run as a learner runs it: in Jupyter, in a browser.

nbval (see notebooks/conftest.py) runs each notebook in a kernel of its
own and compares outputs as text. What it cannot see is what the learner
sees: whether Jupyter Notebook 7 renders the cluster's HTML table, and
whether running every cell from the menu ends without an error on the
page. This test starts a real Jupyter Notebook server with HOME and every
Jupyter and IPython folder of its own, opens a copy of
``notebooks/01-local-clusters.ipynb`` (its outputs cleared, so that all
that is shown comes from this run) in headless Chromium, chooses
Run > Run All Cells, and waits until the kernel is idle and the last
cell has run. Then it checks the page and the notebook as Jupyter saved
it, keeps a screenshot in the test's ``tmp_path``, and stops the server,
which must leave no process behind: not the kernel, and not a worker
that the notebook started.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request

import nbformat
import psutil
import pytest

import browser
from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "01-local-clusters.ipynb")

# Jupyter settings for a test: every cell in the page whether it is in
# view or not (by default cells far out of view may be left undrawn), and
# no calls home for news or new versions.
SETTINGS = {
    "notebook-extension/tracker": {"windowingMode": "none"},
    "apputils-extension/notification": {"fetchNews": "false",
                                        "checkForUpdates": False},
}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(browser.chromium_missing() is not None,
                       reason=str(browser.chromium_missing())),
]


# The server ----------------------------------------------------------------

class NotebookServer:
    """``jupyter notebook`` on a free port, serving one folder."""

    def __init__(self, folder, home):
        self.folder = folder
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = os.path.join(home, "jupyter.log")
        self.env = dict(
            os.environ, HOME=home,
            JUPYTER_CONFIG_DIR=os.path.join(home, "jupyter-config"),
            JUPYTER_DATA_DIR=os.path.join(home, "jupyter-data"),
            JUPYTER_RUNTIME_DIR=os.path.join(home, "jupyter-runtime"),
            IPYTHONDIR=os.path.join(home, "ipython"))
        self.process = None
        self.seen = set()  # every descendant seen while it ran

    def start(self, timeout=90):
        write_settings(self.env["JUPYTER_CONFIG_DIR"])
        command = [
            sys.executable, "-m", "jupyter", "notebook", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={self.folder}", "--allow-root",
        ]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command, env=self.env, cwd=self.folder,
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"jupyter notebook exited with "
                                     f"{self.process.returncode}:\n"
                                     f"{self.log()}")
            try:
                self.api("status")
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"jupyter notebook did not answer on port "
                             f"{self.port} within {timeout} s:\n"
                             f"{self.log()}")

    def api(self, path, method="GET"):
        request = urllib.request.Request(
            f"{self.url}api/{path}", method=method,
            headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def page_url(self, name):
        return f"{self.url}notebooks/{name}?token={self.token}"

    def note_descendants(self):
        """Remember the processes the server runs now (kernels, workers)."""
        try:
            self.seen.update(psutil.Process(self.process.pid).children(
                recursive=True))
        except psutil.NoSuchProcess:
            pass

    def stop(self):
        """Shut the kernels down, then the server; return what survived."""
        self.note_descendants()
        try:
            for kernel in self.api("kernels"):
                self.api(f"kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass  # the server is gone already; wait for what it left
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _, alive = psutil.wait_procs(self.seen, timeout=30)
        return alive

    def log(self):
        with open(self.log_path, errors="replace") as file:
            return file.read()


def write_settings(config_dir):
    for name, values in SETTINGS.items():
        path = os.path.join(config_dir, "lab", "user-settings",
                            "@jupyterlab", name + ".jupyterlab-settings")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            json.dump(values, file)


def cleared_copy(source, folder):
    """Copy a notebook into ``folder`` with its outputs cleared."""
    notebook = nbformat.read(source, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    path = os.path.join(folder, os.path.basename(source))
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def served(tmp_path):
    """A notebook server on a cleared copy of the first notebook."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    copy = cleared_copy(NOTEBOOK, str(work))
    server = NotebookServer(str(work), str(home)).start()
    try:
        yield server, copy
    finally:
        alive = server.stop()
        assert not alive, (f"processes of the notebook server outlived it: "
                           f"{alive}\n{server.log()[-3000:]}")


# The page ------------------------------------------------------------------

def wait_for_kernel(watched, server, timeout=90):
    """Wait until the page's kernel runs, is connected and idle."""
    def ready():
        kernels = server.api("kernels")
        return (len(kernels) == 1 and kernels[0]["connections"] >= 1
                and kernels[0]["execution_state"] == "idle")
    browser.wait_until(watched, ready, "a kernel connected to the page, "
                       "and idle", timeout=timeout, interval=0.3)
    # The page learns of its kernel a moment after the server does.
    watched.page.wait_for_selector(
        ".jp-Notebook-ExecutionIndicator[data-status='idle']",
        timeout=timeout * 1000)


def run_all_cells(watched):
    """Run > Run All Cells, from the menu bar, as a learner would."""
    page = watched.page
    page.locator(".lm-MenuBar-itemLabel",
                 has_text=re.compile("^Run$")).click()
    page.locator(".lm-Menu-itemLabel",
                 has_text=re.compile("^Run All Cells$")).click()


def prompts(watched):
    """The text of each code cell's input prompt: "[ ]:", "[*]:", "[3]:"."""
    return watched.page.evaluate(
        """() => Array.from(
               document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'),
               prompt => prompt.textContent.trim())""")


def wait_until_all_ran(watched, server, cells, timeout=240):
    """Wait until every code cell shows its count and the kernel is idle.

    A fresh kernel numbers the cells 1, 2, ... in the order they ran, so
    the last one shows "[N]:" for N code cells.
    """
    def done():
        server.note_descendants()
        shown = prompts(watched)
        numbered = shown == [f"[{i}]:" for i in range(1, cells + 1)]
        kernels = server.api("kernels")
        idle = all(k["execution_state"] == "idle" for k in kernels)
        return numbered and idle
    try:
        browser.wait_until(watched, done, "every cell run and the kernel "
                           "idle", timeout=timeout, interval=0.5)
    except AssertionError as exc:
        # Run All stops at a cell that raises: show what it said.
        errors = "\n---\n".join(error_outputs(watched)) or "(none)"
        raise AssertionError(f"{exc}; prompts: {prompts(watched)}; "
                             f"errors shown:\n{errors}") from None


def error_outputs(watched):
    """Text of the outputs on the page that show a Python traceback.

    Jupyter draws errors and text printed to stderr alike (both have the
    stderr mime type); only an error shows IPython's traceback header.
    """
    return watched.page.evaluate(
        """() => Array.from(
               document.querySelectorAll(
                   '.jp-OutputArea-output'
                   + '[data-mime-type="application/vnd.jupyter.stderr"]'),
               output => output.textContent)
             .filter(text =>
                 /Traceback \\(most recent call last\\)/.test(text)
                 || /^-{20,}\\s*\\n\\S+(Error|Exception)/m.test(text))
             .map(text => text.slice(0, 2000))""")


def save(watched, path, cells, timeout=30):
    """Save with the toolbar's button; return the notebook as saved."""
    before = os.stat(path).st_mtime_ns
    watched.page.locator('[data-command="docmanager:save"]').click()

    def saved():
        if os.stat(path).st_mtime_ns == before:
            return None
        notebook = nbformat.read(path, as_version=4)
        counts = [c.execution_count for c in notebook.cells
                  if c.cell_type == "code"]
        return notebook if counts == list(range(1, cells + 1)) else None
    return browser.wait_until(watched, saved, f"{path} saved with every "
                              f"cell's output", timeout=timeout)


# The test ------------------------------------------------------------------

def test_first_notebook_runs_in_jupyter_in_a_browser(served, tmp_path):
    server, copy = served
    with open(NOTEBOOK, "rb") as file:
        stored = file.read()
    cells = sum(1 for cell in nbformat.read(copy, as_version=4).cells
                if cell.cell_type == "code")

    with browser.open_page() as watched:
        watched.page.goto(server.page_url(os.path.basename(copy)))
        wait_for_kernel(watched, server)
        assert prompts(watched) == ["[ ]:"] * cells

        run_all_cells(watched)
        wait_until_all_ran(watched, server, cells)

        # The cluster's HTML view: the table that minidask/templates/
        # cluster.html renders, titled with the cluster's type.
        table = watched.page.locator(
            '.jp-OutputArea-output[data-mime-type="text/html"]',
            has_text="LocalCluster").first
        table.wait_for(timeout=10_000)
        text = table.inner_text()
        for fact in ("Status", "Scheduler", "tcp://127.0.0.1:", "Workers",
                     "Threads", "Memory"):
            assert fact in text, f"{fact!r} missing from the cluster's " \
                                 f"HTML view:\n{text}"
        table.scroll_into_view_if_needed()
        watched.page.screenshot(path=str(tmp_path / "01-local-clusters.png"))

        errors = error_outputs(watched)
        assert not errors, "cells show errors:\n" + "\n---\n".join(errors)
        notebook = save(watched, copy, cells)

    failed = [(cell.execution_count, output.get("ename"))
              for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert failed == [], f"cells that raised, as Jupyter saved them: " \
                         f"{failed}"
    html = [output.data["text/html"]
            for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs
            if "text/html" in output.get("data", {})]
    assert any("LocalCluster" in view for view in html)

    with open(NOTEBOOK, "rb") as file:
        assert file.read() == stored, "the stored notebook was modified"
