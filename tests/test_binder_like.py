"""Every notebook, run as a learner on Binder runs it.

On Binder the tutorial runs as an ordinary user (not root), in a fresh
home folder, in a container where no SSH server runs or may be started.
The notebooks' own test (``python -m pytest notebooks/``, see
notebooks/conftest.py) runs as whoever runs the tests, which in CI is
root, with root's home. This test runs that same nbval run, strict and
with the same sanitize file, in a setting like Binder's:

- as the unprivileged user ``minidask-test`` (created when absent), with
  an empty home folder of its own and nothing of this process's
  environment: ``env -i`` and a handful of variables;
- on a copy of the repository that the user owns, as a Binder user owns
  the repository it was given;
- through ``binder/start``, as Binder starts Jupyter, with
  ``BINDER_LAUNCH_HOST`` set as on Binder;
- with no SSH server that the user can log in to: the fresh home holds
  no keys and no known hosts, so even where an sshd listens on port 22
  the SSH notebook cannot log in to it, and must choose minidask's
  embedded server (which, as sshd does, runs its commands in the home
  folder that the password database gives the user).

``JUPYTERHUB_SERVICE_PREFIX`` is left unset. On Binder it is set, and
``binder/start`` then points dashboard links through the hub's proxy, so
the links that the notebooks print would differ from the stored ones;
that changes what a link reads, not whether the notebooks work, and the
start script's part is tested in test_binder.py. Unset, ``binder/start``
leaves the links plain, and every stored output must match.

The user needs a Python it may run: tests/sshd_fixture.py finds or
builds one (see its design note), as it does for the SSH tests. Every
process of the run carries a mark in its environment; once the run ends,
no process with that mark may be left.

It runs as root only (it switches to another user), and takes about as
long as running the notebooks does, plus a few seconds to link the
interpreter: one to two minutes on two cores, so it is part of
``make test``.
"""

import os
import secrets
import shutil
import subprocess
import tempfile

import psutil
import pytest

from sshd_fixture import (SOURCE_ROOT, ensure_test_user, is_alive,
                          prepare_remote_python)

# What a Binder user's copy of the repository needs to run the notebooks.
COPIED = ["minidask", "notebooks", "binder", "pyproject.toml", "README.md"]
IGNORED = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints",
                                 ".pytest_cache", "*.egg-info")
MARK = "BINDER_LIKE_TEST_RUN"  # not MINIDASK_*: that would be config
RUN_TIMEOUT = 540  # seconds for the whole run; the test's own limit is 600

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="runs the notebooks as the user minidask-test, and only root "
           "may switch to another user: run the tests as root")


@pytest.fixture
def shared_folder():
    """A folder that every user may enter, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="minidask-binder-like-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def copy_repository(target, user):
    """Copy what the notebooks need into ``target``, owned by ``user``."""
    os.makedirs(target)
    for name in COPIED:
        source = os.path.join(SOURCE_ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(target, name),
                            ignore=IGNORED)
        else:
            shutil.copy2(source, target)
    chown_tree(target, user)
    return target


def make_home(path, user):
    os.makedirs(path, mode=0o700)
    chown_tree(path, user)
    return path


def chown_tree(top, user):
    os.chown(top, user.pw_uid, user.pw_gid)
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), user.pw_uid, user.pw_gid,
                     follow_symlinks=False)


def binder_environment(user, home, python, python_env, mark):
    """The whole environment of the run: nothing is inherited."""
    return {
        "HOME": home,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "PATH": os.pathsep.join([os.path.dirname(python), "/usr/bin",
                                 "/bin"]),
        "LANG": "C.UTF-8",
        "BINDER_LAUNCH_HOST": "https://mybinder.org/",
        # What the linked interpreter needs to find its libraries.
        **{name: value for name, value in python_env.items()
           if name != "PYTHONPATH"},
        MARK: mark,
    }


def run_as(user, argv, env, cwd, timeout, output=None):
    return subprocess.run(
        argv, env=env, cwd=cwd, user=user.pw_uid, group=user.pw_gid,
        extra_groups=[], stdin=subprocess.DEVNULL,
        stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout)


def marked_processes(mark):
    """Live processes whose environment carries ``MARK=mark``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == mark and is_alive(proc):
                found.append(proc)
        except psutil.Error:
            pass  # gone, or a kernel thread with no environment
    return found


@pytest.mark.timeout(600)
def test_every_notebook_as_an_unprivileged_binder_user(shared_folder,
                                                        tmp_path):
    user = ensure_test_user()
    remote = prepare_remote_python(user, shared_folder)
    if remote.path is None:
        pytest.skip(f"no Python that {user.pw_name} may run: "
                    f"{remote.problem}")

    repository = copy_repository(os.path.join(shared_folder, "repository"),
                                 user)
    home = make_home(os.path.join(shared_folder, "home"), user)
    mark = secrets.token_hex(8)
    env = binder_environment(user, home, remote.path, remote.env, mark)
    # The copy's minidask, not this one: Binder installs the repository
    # it was given (binder/postBuild), here that is the copy.
    env["PYTHONPATH"] = repository

    probe = run_as(user, [remote.path, "-c",
                          "import minidask; print(minidask.__file__)"],
                   env, repository, timeout=60)
    assert probe.returncode == 0, probe.stdout
    assert probe.stdout.strip().startswith(repository), probe.stdout

    command = [
        os.path.join(repository, "binder", "start"),
        remote.path, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        "-rfE", "--nbval", "--nbval-current-env",
        "--nbval-sanitize-with", "notebooks/sanitize.cfg", "notebooks/",
    ]
    log_path = tmp_path / "nbval.log"
    try:
        with open(log_path, "w") as log:
            result = run_as(user, command, env, repository,
                            timeout=RUN_TIMEOUT, output=log)
    finally:
        _, left = psutil.wait_procs(marked_processes(mark), timeout=30)
        for proc in left:
            proc.kill()
    output = log_path.read_text()
    leftovers = (f"processes of the run left behind (now killed): "
                 f"{left}\n" if left else "")
    assert result.returncode == 0, (
        f"{leftovers}the notebooks failed as {user.pw_name} in a "
        f"Binder-like setting:\n{output[-8000:]}")
    assert not leftovers, leftovers
    assert " passed" in output and "skipped" not in output, output[-2000:]
