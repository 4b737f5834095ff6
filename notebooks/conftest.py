"""How the notebooks are tested.

``python -m pytest`` runs every notebook in this folder with nbval (the
options are in the pytest section of ``pyproject.toml``): each notebook
gets a fresh kernel, its code cells run top to bottom as pytest items, and
each cell's output must equal the output stored in the notebook once the
patterns in ``sanitize.cfg`` have blanked out ports, dates and the like.

Two things outside a notebook would change its outputs; this file deals
with both before the first kernel starts, since a kernel inherits this
process's environment and shares its machine:

- minidask's configuration. A ``MINIDASK_*`` variable (a scheduler
  address, say) would change what ``Client()`` does in the notebooks, so
  the variables are removed from this process's environment.
- The dashboard's default port. The stored outputs show each cluster's
  dashboard on port 8787 and no warning about it. If another program holds
  that port when a notebook starts, its clusters warn that their
  dashboards moved; rather than report that as differing outputs, each
  cell of that notebook fails at once and says why.
"""

import os
import socket

import pytest

DASHBOARD_PORT = 8787

for _name in [n for n in os.environ if n.startswith("MINIDASK_")]:
    del os.environ[_name]


def _port_is_free(port, host="127.0.0.1"):
    """Whether a server could listen on ``host:port`` now."""
    with socket.socket() as sock:
        # As the dashboard's own socket does: a port that a closed server
        # left in TIME_WAIT is free to use again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Whether the dashboard port was free when each notebook's first cell was
# about to run; later cells find it taken by the notebook's own clusters.
_port_free_at_start = {}


def pytest_runtest_setup(item):
    if item.path.suffix != ".ipynb":
        return
    if item.path not in _port_free_at_start:
        _port_free_at_start[item.path] = _port_is_free(DASHBOARD_PORT)
    if not _port_free_at_start[item.path]:
        pytest.fail(
            f"port {DASHBOARD_PORT} was in use when this notebook started, "
            f"so its clusters would serve their dashboards elsewhere and "
            f"warn about it, unlike its stored outputs: stop the program "
            f"that listens on it (perhaps a cluster left open) and run the "
            f"tests again", pytrace=False)
