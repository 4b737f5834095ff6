"""Real SSH servers for the tests: OpenSSH's sshd on 127.0.0.1.

`SSHCluster` must work against the sshd that real hosts run, not only
against minidask's embedded server, so the tests start one. `OpenSSHServer`
runs `/usr/sbin/sshd` in the foreground with a config, a host key and an
authorized key of its own in a throwaway folder, listening on a free port of
127.0.0.1, and serving exactly one user: the current one (root in CI), or
the unprivileged `minidask-test`, created with `useradd` when absent.

sshd has to run as root, since it switches to the user it serves. It runs
as a "child subreaper": a remote command that outlives its connection would
otherwise be handed to init and drop out of sight. So every process sshd
spawns stays its descendant, and `close()` kills them all, then fails loudly
if any survived.

The remote Python (a design note). A remote command does not get this
process's environment but sshd's: a short PATH, and none of what made
`import minidask` work here (the current directory, pytest's sys.path).
Tests need an absolute `remote_python` and a remote environment in which it
imports the minidask under test. sshd's `SetEnv` provides the environment:
PYTHONPATH names the folder that holds this minidask package, then the
entries of this process's PYTHONPATH.

For root that is enough. For `minidask-test` the interpreter itself may be
out of reach: pyenv installs under /root, which is mode 0700, and so may a
clone of the repository with its virtual environment. Copying an
interpreter with its site-packages (over a gigabyte with the test
dependencies) per test run is too slow, and widening the permissions of
/root is not a test's business. Instead `prepare_remote_python` builds a
tree of hard links to the interpreter's prefix in a world-readable folder,
once per test run: the same files, readable by the same rules, made in a
few seconds without copying a byte or changing any existing permission.
Where hard links cannot cross to the shared folder's filesystem, the files
are copied instead, which is slower but works. The interpreter's RUNPATH
still names its original `lib` folder, so LD_LIBRARY_PATH points at the
linked one.

When the tests run in a virtual environment (as `make test` runs them),
its Python is a link to the base interpreter and its packages live in the
environment, not in the base prefix. Then the base prefix is linked
without its own site-packages (unless the environment includes them), and
the environment's files are linked into the same tree: its site-packages,
`share` and the rest, but not its `bin`, whose scripts name the original
environment's Python, nor its `pyvenv.cfg`. A file of the environment
replaces one of the same name. The linked interpreter then sees the
packages that the tests' Python sees, however it is started: a test may
well run it through a symbolic link elsewhere, from where a rebuilt
virtual environment would not be found.

If the user cannot read the minidask package either (a clone under /root,
or an editable install whose finder points there), a copy of it (it is
small) goes in the shared folder, first on PYTHONPATH. Every candidate is
tried by running `python -c "import minidask"` as that user, and must
import this very package, not another install of it. When none works,
`remote_python` is None and `remote_python_problem` says why, and tests
that need it skip.
"""

import dataclasses
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import asyncssh
import psutil

import minidask
# The embedded server's own helpers: a zombie counts as ended, and key
# files are made private from the start.
from minidask.deploy.sshd import _is_alive as is_alive
from minidask.deploy.sshd import _write_private_key

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
TEST_USER = "minidask-test"
HOST = "127.0.0.1"
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(
    minidask.__file__)))

# Run by a small Python that then becomes sshd: the subreaper mark
# survives exec, and no preexec_fn has to run in a threaded test process.
_EXEC_AS_SUBREAPER = (
    "import ctypes, os, sys\n"
    "PR_SET_CHILD_SUBREAPER = 36\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(\n"
    "        PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:\n"
    "    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_CHILD_SUBREAPER)')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)

_SSHD_CONFIG = """\
# A throwaway sshd for minidask's tests, written by tests/sshd_fixture.py.
ListenAddress {host}
Port {port}
HostKey {folder}/ssh_host_ed25519_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
AllowUsers {username}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# Key files only; PAM would add nothing but the host's login policy.
UsePAM no
# The folder is under /tmp, whose world-writable mode StrictModes rejects;
# the folder and its files are root's and writable by nobody else.
StrictModes no
UseDNS no
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
{set_env}
"""


@dataclasses.dataclass
class RemotePython:
    """A Python a user can run over SSH, and the environment it needs."""

    path: str | None
    env: dict
    problem: str | None = None


def sshd_problem():
    """Why a real sshd cannot run here, or None if it can."""
    if not os.path.exists(SSHD):
        return (f"OpenSSH's sshd is not installed ({SSHD} is missing):"
                f" install it with `apt-get install -y openssh-server`")
    if os.geteuid() != 0:
        return ("sshd must run as root to switch to the user it serves:"
                " run the SSH tests as root")
    return None


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def ensure_test_user():
    """The password entry of `minidask-test`, created if absent."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        pass
    # "*" is no password to log in with, yet not a locked account: with
    # UsePAM off, sshd refuses locked accounts even for key logins.
    result = subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", "--password",
         "*", "--comment", "minidask tests", TEST_USER],
        capture_output=True, text=True)
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        raise RuntimeError(f"could not create the test user {TEST_USER}:"
                           f" {result.stderr.strip()}") from None
    logger.info("created user %s for the SSH tests", TEST_USER)
    return entry


def current_user():
    return pwd.getpwuid(os.getuid())


def python_path(first):
    """`first`, then this process's PYTHONPATH, as one PYTHONPATH value.

    Remote workers then import what local ones would, test modules too.
    """
    rest = os.environ.get("PYTHONPATH")
    return os.pathsep.join(path for path in (first, rest) if path)


# -- the remote Python -----------------------------------------------------

def prepare_remote_python(user, shared_folder):
    """Find or build a Python that `user` can import minidask with.

    `shared_folder` must be readable by `user`; links and copies go there,
    and removing it removes them. Returns a `RemotePython`: `path` is the
    interpreter to run (None, with the reason in `problem`, if there is
    none), `env` the environment it needs: LD_LIBRARY_PATH for a linked
    interpreter, and PYTHONPATH naming the folder that holds the minidask
    package under test (or its copy). The interpreter finds its
    site-packages by itself, so a caller may replace PYTHONPATH with
    another folder holding a minidask package.

    This works whether the tests run in the base interpreter or in a
    virtual environment (see the module's design note). Calling it again
    with the same `shared_folder` reuses what the first call built.
    """
    env = {"PYTHONPATH": python_path(SOURCE_ROOT)}
    problem = _probe(user, sys.executable, env, SOURCE_ROOT)
    if problem is None:
        return RemotePython(sys.executable, env)

    try:
        python, lib = _link_interpreter(shared_folder)
    except OSError as exc:
        return RemotePython(None, {}, f"{user.pw_name} cannot use"
                            f" {sys.executable} ({problem}), and linking it"
                            f" into {shared_folder} failed: {exc}")
    env["LD_LIBRARY_PATH"] = lib
    problem = _probe(user, python, env, SOURCE_ROOT)
    if problem is None:
        return RemotePython(python, env)

    copy = _copy_package(shared_folder)
    env["PYTHONPATH"] = python_path(copy)
    problem = _probe(user, python, env, copy)
    if problem is None:
        return RemotePython(python, env)
    return RemotePython(None, {}, f"{user.pw_name} cannot import minidask"
                        f" with a linked {python}: {problem}")


def _probe(user, python, env, source_root):
    """None if `user` imports minidask from `source_root`, else why not."""
    home = user.pw_dir if os.path.isdir(user.pw_dir) else "/"
    try:
        result = subprocess.run(
            [python, "-c", "import minidask; print(minidask.__file__)"],
            env={"PATH": "/usr/bin:/bin", **env}, cwd=home,
            user=user.pw_uid, group=user.pw_gid, extra_groups=[],
            capture_output=True, text=True, timeout=60)
    except OSError as exc:
        return str(exc)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {result.returncode}"

    # An installed minidask elsewhere would import too, but it is not the
    # one under test.
    found = os.path.dirname(os.path.dirname(result.stdout.strip()))
    if os.path.realpath(found) != os.path.realpath(source_root):
        return f"it imports minidask from {found}, not from {source_root}"
    return None


def _link_interpreter(shared_folder):
    """Hard-link this interpreter's prefix; return its python and lib.

    In a virtual environment, the environment goes into the same tree.
    """
    # A virtual environment's Python is a link to (or a copy of) this one.
    executable = os.path.realpath(getattr(sys, "_base_executable",
                                          sys.executable))
    relative = os.path.relpath(executable, sys.base_prefix)
    if relative.startswith(os.pardir):
        raise OSError(f"{executable} is outside its prefix"
                      f" {sys.base_prefix}")

    def build(folder):
        in_venv = sys.prefix != sys.base_prefix
        skipped = set()
        if in_venv and not _includes_system_site_packages():
            skipped = _site_packages(sys.base_prefix)
        _link_tree(sys.base_prefix, folder, skipped)
        if in_venv:
            _link_tree(sys.prefix, folder, {
                os.path.join(sys.prefix, name)
                for name in ("bin", "pyvenv.cfg")})

    prefix = os.path.join(shared_folder, "python")
    _build_once(prefix, build)
    return os.path.join(prefix, relative), os.path.join(prefix, "lib")


def _includes_system_site_packages():
    """Whether this virtual environment sees the base's site-packages."""
    with open(os.path.join(sys.prefix, "pyvenv.cfg")) as file:
        for line in file:
            key, _, value = line.partition("=")
            if key.strip() == "include-system-site-packages":
                return value.strip().lower() == "true"
    return True  # as the site module reads a pyvenv.cfg without the key


def _site_packages(prefix):
    """The site-packages folders of an interpreter's `prefix`."""
    paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})
    return {os.path.normpath(paths[name]) for name in ("purelib", "platlib")}


def _build_once(target, build):
    """Run `build` on a fresh folder that becomes `target`, unless it is.

    A build that fails half-way leaves no `target` to be reused.
    """
    if os.path.isdir(target):
        return
    partial = f"{target}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        build(partial)
        os.rename(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _link_tree(source, target, skipped=()):
    """Hard-link (else copy) the tree `source` into `target`.

    Folders merge with those already in `target`, and a file replaces one
    of the same name there. A symbolic link is made anew as one, unless
    `target` has something of that name already. `skipped` holds
    normalized paths under `source` to leave out.
    """
    def ignore(folder, names):
        left_out = []
        for name in names:
            path = os.path.normpath(os.path.join(folder, name))
            there = os.path.join(target, os.path.relpath(path, source))
            if path in skipped or (os.path.islink(path)
                                   and os.path.lexists(there)):
                left_out.append(name)
        return left_out

    shutil.copytree(source, target, symlinks=True, ignore=ignore,
                    copy_function=_link_file, dirs_exist_ok=True)


def _link_file(source, target):
    # Unlinking first: writing into a hard link would change the original.
    if os.path.lexists(target):
        os.unlink(target)
    try:
        os.link(source, target)
    except OSError:
        # Another filesystem, or one without hard links.
        shutil.copy2(source, target)


def _copy_package(shared_folder):
    """Copy the minidask package; return the folder to put on PYTHONPATH."""
    source = os.path.dirname(os.path.abspath(minidask.__file__))
    root = os.path.join(shared_folder, "source")
    _build_once(root, lambda folder: shutil.copytree(
        source, os.path.join(folder, "minidask"),
        ignore=shutil.ignore_patterns("__pycache__")))
    return root


# -- the server ------------------------------------------------------------

class OpenSSHServer:
    """OpenSSH's sshd on a free port of 127.0.0.1, for one user.

    `host`, `port`, `username`, `known_hosts` and `connect_options` have
    the meaning they have on `EmbeddedSSHServer`;
    `asyncssh.connect(server.host, **server.connect_options)` logs in.
    `remote_python` is a Python the user can run and import minidask with
    (None, with the reason in `remote_python_problem`, when there is none).
    """

    def __init__(self, user=None, remote_python=None, start_timeout=10):
        self.user = user or current_user()
        self.username = self.user.pw_name
        self.host = HOST
        self.port = None
        self.start_timeout = start_timeout
        remote_python = remote_python or RemotePython(
            None, {}, "none was prepared for this server")
        self.remote_python = remote_python.path
        self.remote_python_problem = remote_python.problem
        self.remote_env = dict(remote_python.env)
        self.folder = None
        self.known_hosts = None
        self.client_key = None
        self.connect_options = {}
        self._host_public_key = None
        self._proc = None

    def __repr__(self):
        return f"<OpenSSHServer {self.username}@{self.host}:{self.port}>"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        """Write keys and config, start sshd, wait until it listens."""
        problem = sshd_problem()
        if problem:
            raise RuntimeError(problem)
        # sshd's privilege separation needs this folder. Its service makes
        # it at boot, and a container never boots that service.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

        self.folder = tempfile.mkdtemp(prefix="minidask-test-sshd-")
        try:
            # The served user reads authorized_keys after sshd drops to it.
            os.chmod(self.folder, 0o755)
            self._write_keys()
            self._start_on_a_free_port()
        except BaseException:
            self._remove_folder()
            raise
        logger.info("sshd for %s listening on %s:%d", self.username,
                    self.host, self.port)
        return self

    def descendants(self):
        """The processes sshd has spawned and that are still running."""
        if self._proc is None:
            return []
        try:
            children = psutil.Process(self._proc.pid).children(
                recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [proc for proc in children if is_alive(proc)]

    def close(self):
        """Kill every spawned process, then sshd; fail if any survived."""
        if self._proc is None:
            return
        try:
            survivors = self._kill_descendants()
            self._stop_sshd()
        finally:
            self._proc = None
            self._remove_folder()
        if survivors:
            raise AssertionError(f"processes spawned by sshd survived its"
                                 f" close: {survivors}")

    # -- starting ---------------------------------------------------------

    def _write_keys(self):
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        _write_private_key(host_key, self._path("ssh_host_ed25519_key"))
        self._host_public_key = host_key.export_public_key().decode().strip()

        client_key = asyncssh.generate_private_key(
            "ssh-ed25519", comment=f"{self.username}@minidask-tests")
        self.client_key = self._path("client_key")
        _write_private_key(client_key, self.client_key)
        with open(self._path("authorized_keys"), "wb") as file:
            file.write(client_key.export_public_key())
        os.chmod(self._path("authorized_keys"), 0o644)

    def _start_on_a_free_port(self):
        # A free port can be taken between our look and sshd's bind.
        for _ in range(3):
            self.port = free_port()
            self._write_config()
            if self._start_sshd():
                break
        else:
            raise RuntimeError(f"sshd did not start on {self.host}:"
                               f"{self.port}: {self._log_tail()}")

        names = f"[{self.host}]:{self.port},[localhost]:{self.port}"
        self.known_hosts = self._path("known_hosts")
        with open(self.known_hosts, "w") as file:
            file.write(f"{names} {self._host_public_key}\n")
        self.connect_options = {
            "port": self.port,
            "username": self.username,
            "client_keys": [self.client_key],
            "known_hosts": self.known_hosts,
            "agent_path": None,
        }

    def _write_config(self):
        set_env = " ".join(f'"{name}={value}"'
                           for name, value in self.remote_env.items())
        config = _SSHD_CONFIG.format(
            host=self.host, port=self.port, folder=self.folder,
            username=self.username,
            set_env=f"SetEnv {set_env}" if set_env else "")
        with open(self._path("sshd_config"), "w") as file:
            file.write(config)

    def _start_sshd(self):
        """Start sshd; True once it listens, False if it gave up."""
        with open(self._path("sshd.log"), "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _EXEC_AS_SUBREAPER, SSHD,
                 "-D", "-e", "-f", self._path("sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if "Server listening on" in self._log_tail():
                return True
            if self._proc.poll() is not None:
                self._proc = None
                return False
            time.sleep(0.02)
        self._stop_sshd()
        self._proc = None
        raise RuntimeError(f"sshd did not listen on {self.host}:{self.port}"
                           f" within {self.start_timeout} s:"
                           f" {self._log_tail()}")

    # -- closing ----------------------------------------------------------

    def _kill_descendants(self):
        """SIGKILL what sshd spawned until nothing is left; return leftovers.

        sshd stays up meanwhile: as the subreaper it adopts, and so lets us
        see, whatever a dying session leaves behind.
        """
        seen = set()
        for _ in range(10):
            procs = self.descendants()
            if not procs:
                break
            seen.update(procs)
            for proc in procs:
                try:
                    proc.kill()
                except psutil.Error:
                    pass  # already gone
            psutil.wait_procs(procs, timeout=5)
        return [proc for proc in seen if is_alive(proc)]

    def _stop_sshd(self):
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _remove_folder(self):
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, name):
        return os.path.join(self.folder, name)

    def _log_tail(self, lines=20):
        try:
            with open(self._path("sshd.log"), errors="replace") as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return "(no log)"


