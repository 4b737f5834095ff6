"""The command line: minidask-scheduler, minidask-worker, minidask-ssh.

Each command starts one server, prints its address on a line of its own
on standard output once it listens (so that a script, or an SSH cluster,
can read it), logs to standard error, and stops cleanly on Ctrl-C
(SIGINT) or SIGTERM; with ``--stop-on-eof`` also when its standard input
ends, which is how ``SSHCluster`` ties each remote command to its channel.

The cluster secret: ``minidask-scheduler`` makes a new one unless
``MINIDASK_SECRET`` or ``--secret-file`` gives it, and writes it to a file
only its user can read, whose path it logs. ``minidask-worker`` reads it
from ``MINIDASK_SECRET``, ``--secret-file`` (``-`` reads one line from
standard input), or that file. It never appears on a command line, where
``ps`` would show it to every user of the machine.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading

from minidask import logs
from minidask.comm import ConnectError, parse_host_port

# Not __name__: run as `python -m minidask.cli` that is "__main__", outside
# the "minidask" logger tree whose lines reach standard error.
logger = logging.getLogger("minidask.cli")


def _read_secret(path):
    from minidask.core import read_secret_file
    if path == "-":
        secret = sys.stdin.readline().strip()
        if not secret:
            raise SystemExit("--secret-file -: no secret on standard input")
        return secret
    return read_secret_file(path)


async def _serve(server, stop_signals=(signal.SIGINT, signal.SIGTERM),
                 stop_on_eof=False):
    """Run ``server`` until a signal arrives or it finishes by itself.

    With ``stop_on_eof``, the end of standard input stops it too: a server
    started over SSH then ends with its channel, even when the connection
    is lost without a word (sshd closes the command's stdin either way).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reasons = []

    def stop_because(reason):
        reasons.append(reason)
        stop.set()

    for sig in stop_signals:
        loop.add_signal_handler(sig, stop_because,
                                f"{signal.Signals(sig).name} received")
    if stop_on_eof:
        _call_at_eof(loop, stop_because, "standard input closed")
    finished = asyncio.ensure_future(server.finished()) \
        if hasattr(server, "finished") else loop.create_future()
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([finished, waiter],
                       return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        logger.info("%s: closing", reasons[0])
        await server.close()
    waiter.cancel()


def _call_at_eof(loop, callback, *args):
    """Call ``callback(*args)`` on ``loop`` once standard input ends."""
    def read_to_the_end():
        # Blocking reads in a thread of their own: asyncio cannot watch
        # every kind of stdin (a file, a terminal) on every platform.
        while sys.stdin.read(4096):
            pass
        loop.call_soon_threadsafe(callback, *args)

    threading.Thread(target=read_to_the_end, name="stdin-eof",
                     daemon=True).start()


def _print_address(address):
    print(address, flush=True)


_STOP_ON_EOF_HELP = ("stop when standard input ends, as it does when the "
                     "SSH channel of a remote command goes away")


def _add_tls_options(parser):
    group = parser.add_argument_group(
        "TLS", "encrypt every connection (all three are needed)")
    group.add_argument("--tls-ca-file", help="the cluster's CA certificate")
    group.add_argument("--tls-cert", help="this server's certificate")
    group.add_argument("--tls-key", help="the private key of --tls-cert")


def _security(args):
    from minidask.security import Security
    if args.tls_cert or args.tls_ca_file or args.tls_key:
        return Security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return Security.from_config()


# -- minidask-scheduler ---------------------------------------------------------

def scheduler_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="minidask-scheduler",
        description="Start a minidask scheduler and serve until stopped.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this "
                             "machine only; 0.0.0.0 for every network)")
    parser.add_argument("--port", type=int, default=8786,
                        help="port to listen on (default 8786, 0 for any)")
    parser.add_argument("--dashboard-address", default=":8787",
                        help="host:port of the dashboard (default :8787)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="do not start the dashboard")
    parser.add_argument("--secret-file",
                        help="read the cluster secret from this file "
                             "(- for standard input)")
    parser.add_argument("--stop-on-eof", action="store_true",
                        help=_STOP_ON_EOF_HELP)
    _add_tls_options(parser)
    args = parser.parse_args(argv)
    logs.setup(logging.INFO)
    try:
        asyncio.run(_run_scheduler(args))
    except OSError as exc:
        raise SystemExit(f"minidask-scheduler: {exc}") from None


async def _run_scheduler(args):
    from minidask.core import new_secret
    from minidask.scheduler import Scheduler
    secret = os.environ.get("MINIDASK_SECRET") or (
        _read_secret(args.secret_file) if args.secret_file else new_secret())
    dashboard = None
    if not args.no_dashboard:
        dash_host, dash_port = parse_host_port(args.dashboard_address, 8787)
        dashboard = f"{dash_host or args.host}:{dash_port}"
    scheduler = Scheduler(host=args.host, port=args.port, secret=secret,
                          dashboard_address=dashboard,
                          security=_security(args))
    await scheduler.start()
    logger.info("secret file for workers and clients: %s",
                scheduler.secret_file)
    _print_address(scheduler.address)
    await _serve(scheduler, stop_on_eof=args.stop_on_eof)


# -- minidask-worker --------------------------------------------------------------

def worker_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="minidask-worker",
        description="Start a minidask worker (under a nanny) for a scheduler.")
    parser.add_argument("scheduler_address",
                        help="the scheduler, as tcp://host:port")
    parser.add_argument("--nthreads", type=int, default=1,
                        help="threads running tasks (default 1)")
    parser.add_argument("--memory-limit", default="auto",
                        help="memory the worker may use: 'auto' (the "
                             "machine's), '4 GiB', a fraction, or 0 for none")
    parser.add_argument("--name", help="a name for the worker")
    parser.add_argument("--no-nanny", action="store_true",
                        help="run the worker in this process, with no nanny "
                             "to restart it")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the worker listens on (default "
                             "127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="port the worker listens on (default: any)")
    parser.add_argument("--secret-file",
                        help="read the cluster secret from this file "
                             "(- for standard input)")
    parser.add_argument("--stop-on-eof", action="store_true",
                        help=_STOP_ON_EOF_HELP)
    parser.add_argument("--nanny-address", help=argparse.SUPPRESS)
    parser.add_argument("--log-level", type=int, default=logging.INFO,
                        help=argparse.SUPPRESS)
    _add_tls_options(parser)
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        code = asyncio.run(_run_worker(args))
    except (OSError, ValueError, TimeoutError) as exc:
        raise SystemExit(f"minidask-worker: {exc}") from None
    sys.exit(code)


def _worker_secret(args):
    from minidask.core import secret_for
    secret = os.environ.get("MINIDASK_SECRET")
    if not secret and args.secret_file:
        secret = _read_secret(args.secret_file)
    if not secret:
        secret = secret_for(args.scheduler_address)
    if not secret:
        raise SystemExit(
            f"minidask-worker: no cluster secret for "
            f"{args.scheduler_address}: give --secret-file with the file "
            f"minidask-scheduler wrote, or set MINIDASK_SECRET")
    return secret


async def _run_worker(args):
    from minidask.deploy.sizing import memory_per_worker
    secret = _worker_secret(args)
    memory_limit = memory_per_worker(args.memory_limit, 1)
    if args.no_nanny:
        return await _run_bare_worker(args, secret, memory_limit)
    from minidask.nanny import Nanny
    nanny = Nanny(args.scheduler_address, nthreads=args.nthreads,
                  memory_limit=memory_limit, name=args.name, host=args.host,
                  secret=secret, silence_logs=logging.INFO,
                  worker_port=args.port, security=_security(args))
    await nanny.start()
    # Print the address only once the scheduler knows the worker, so that
    # whoever reads it can use the worker straight away.
    await nanny.pool.call(args.scheduler_address, "wait-for-worker",
                          address=nanny.worker_address, timeout=60)
    _print_address(nanny.worker_address)
    await _serve(nanny, stop_on_eof=args.stop_on_eof)
    return 0


async def _run_bare_worker(args, secret, memory_limit):
    from minidask.worker import EXIT_SCHEDULER_LOST, Worker
    if args.nanny_address:
        # A worker process under a nanny is the only server in its
        # process: its log keeps every line, the user's tasks' included.
        logging.getLogger().setLevel(logging.INFO)
    worker = Worker(args.scheduler_address, nthreads=args.nthreads,
                    memory_limit=memory_limit, name=args.name,
                    host=args.host, port=args.port, secret=secret,
                    nanny=args.nanny_address, security=_security(args),
                    log_everything=bool(args.nanny_address))
    try:
        await worker.start()
    except ConnectError as exc:
        print(f"minidask-worker: {exc}", file=sys.stderr)
        return EXIT_SCHEDULER_LOST
    if not args.nanny_address:
        _print_address(worker.address)
    await _serve(worker, stop_on_eof=args.stop_on_eof)
    return EXIT_SCHEDULER_LOST if worker.scheduler_lost else 0


# -- minidask-ssh -------------------------------------------------------------------

def ssh_main(argv=None):
    from minidask.deploy.ssh import ssh_main as main
    return main(argv)


if __name__ == "__main__":
    commands = {"scheduler": scheduler_main, "worker": worker_main,
                "ssh": ssh_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m minidask.cli "
                         f"{{{','.join(commands)}}} ...")
    commands[sys.argv[1]](sys.argv[2:])
