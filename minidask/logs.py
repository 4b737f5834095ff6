"""Logs: what each scheduler, worker and nanny remembers of its own log.

Every minidask server keeps its recent log lines in memory, in a bounded
buffer (config ``logging.buffer-length``), and serves them over its comm so
that ``Client.get_worker_logs()`` and ``cluster.get_logs()`` can show them
from a notebook. A log record belongs to a server when it was logged
through that server's adapter (``server.log``), or from one of that
server's task threads, or, in a process that runs a single server (a
worker under a nanny), when it was logged anywhere in the process.

minidask logs to the ``minidask`` logger tree. By default it prints only
warnings to standard error; INFO lines are still kept in the buffers.
"""

import collections
import logging
import sys
import threading

from minidask import config

FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

logger = logging.getLogger(__name__)
_stderr_handler = None
_lock = threading.Lock()


def setup(stderr_level=logging.WARNING):
    """Give the ``minidask`` loggers a stderr handler at ``stderr_level``.

    Called when the first server starts; called again it only changes the
    level, so that a command-line tool can print INFO lines.
    """
    global _stderr_handler
    with _lock:
        root = logging.getLogger("minidask")
        if _stderr_handler is None:
            _stderr_handler = logging.StreamHandler(sys.stderr)
            _stderr_handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(_stderr_handler)
            root.setLevel(logging.INFO)
            root.propagate = False
        _stderr_handler.setLevel(stderr_level)


def stderr_level():
    """The level from which minidask's lines are printed to stderr."""
    return _stderr_handler.level if _stderr_handler else logging.WARNING


class LogBuffer(logging.Handler):
    """Keep the most recent formatted records of one server.

    A record is kept when it is tagged with one of ``owners``; when it
    was logged from one of ``threads``; and, untagged, when ``everything``
    is set or, with ``process_lines`` (the default), when it comes from a
    ``minidask`` logger. Untagged minidask lines (the client's, the
    comms') belong to the process, so ``process_lines`` suits a server
    that has its process to itself, or leads it as a LocalCluster's
    scheduler does; the workers that run as threads of a LocalCluster
    turn it off, and keep only their own lines.
    """

    def __init__(self, owner_id, threads=(), maxlen=None, everything=False):
        super().__init__(logging.DEBUG)
        if maxlen is None:
            maxlen = int(config.get("logging.buffer-length"))
        self.owners = {owner_id}  # the servers whose tagged lines are ours
        self.threads = threads  # a live set of thread idents owned
        self.everything = everything
        self.process_lines = True
        self.records = collections.deque(maxlen=maxlen)
        self.setFormatter(logging.Formatter(FORMAT))

    def filter(self, record):
        owner = getattr(record, "server", None)
        if owner is not None:
            return owner in self.owners
        return (self.everything or record.thread in self.threads
                or (self.process_lines
                    and record.name.startswith("minidask")))

    def emit(self, record):
        if record.levelno < logging.INFO:
            return
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:
            self.handleError(record)

    def lines(self, n=None):
        """The last ``n`` (level, line) pairs, newest first."""
        items = list(self.records)
        if n is not None:
            items = items[-n:] if n > 0 else []
        return items[::-1]


def attach(buffer, names=("minidask",)):
    """Start feeding ``buffer`` from the named loggers."""
    for name in names:
        logging.getLogger(name).addHandler(buffer)


def detach(buffer, names=("minidask",)):
    """Stop feeding ``buffer``; the lines it holds stay readable."""
    for name in names:
        logging.getLogger(name).removeHandler(buffer)


class ServerLog(logging.LoggerAdapter):
    """A module logger that tags each record with the server it is for."""

    def __init__(self, module_logger, server_id):
        super().__init__(module_logger, {"server": server_id})

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {}).update(self.extra)
        return msg, kwargs
