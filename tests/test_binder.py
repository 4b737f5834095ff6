"""The Binder set-up, and the conda environment that copies it.

Binder builds the tutorial's image with repo2docker. A repository with a
``binder/`` folder gets only the files in that folder read, and any
environment file at the top level ignored; the top-level
``environment.yml`` is there for conda users, and must say the same as
Binder's. These tests check that both list what minidask and the tutorial
need, that the start script points dashboard links through the hub, and,
where repo2docker is installed, that it really builds from ``binder/``.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]


def environment(path=BINDER / "environment.yml"):
    with open(path) as file:
        return yaml.safe_load(file)


def pip_requirements(env):
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(sections) == 1, "one pip section"
    return {canonicalize_name(Requirement(r).name): Requirement(r)
            for r in sections[0]}


def needed():
    """What the tutorial needs: minidask's dependencies and its extra."""
    project = pyproject()
    names = project["dependencies"] + project["optional-dependencies"][
        "tutorial"]
    return [Requirement(r) for r in names if not r.startswith("minidask")]


def test_top_level_environment_is_binders():
    assert (ROOT / "environment.yml").read_text() == \
        (BINDER / "environment.yml").read_text()


def test_environment_lists_what_the_tutorial_needs():
    listed = pip_requirements(environment())
    for requirement in needed():
        name = canonicalize_name(requirement.name)
        assert name in listed, f"{name} is missing from environment.yml"
        ours = listed[name]
        assert requirement.extras <= ours.extras
        # As tight as pyproject.toml or tighter, and bounded above.
        assert {str(s) for s in requirement.specifier} <= \
            {str(s) for s in ours.specifier}, str(ours)
        assert any(s.operator in ("<", "<=", "==", "~=")
                   for s in ours.specifier), f"{ours} has no upper bound"


def test_the_tests_run_with_versions_inside_those_bounds():
    # The notebooks' stored outputs come from this environment; Binder
    # should build one that the same bounds allow.
    for name, requirement in pip_requirements(environment()).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert requirement.specifier.contains(installed,
                                              prereleases=True), (
            f"{name} {installed} is installed here, outside {requirement}")


def test_environment_has_the_python_of_the_tutorial():
    assert "python=3.11" in environment()["dependencies"]


def test_nothing_installs_or_starts_an_ssh_server():
    # Binder forbids running sshd; the SSH notebook uses minidask's own
    # embedded server instead.
    for path in BINDER.iterdir():
        text = path.read_text().lower()
        assert "openssh" not in text and "sshd" not in text, path.name
    assert not (BINDER / "apt.txt").exists()


@pytest.mark.parametrize("name", ["postBuild", "start"])
def test_scripts_are_executable_and_stop_at_the_first_error(name):
    script = BINDER / name
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/bin/bash\n")
    if name == "postBuild":
        assert "\nset -e\n" in script.read_text()
        assert "pip install --no-deps -e ." in script.read_text()


def run_start(command, prefix=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MINIDASK_", "JUPYTERHUB_"))}
    if prefix is not None:
        env["JUPYTERHUB_SERVICE_PREFIX"] = prefix
    return subprocess.run([str(BINDER / "start"), *command], env=env,
                          capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


LINK = ("from minidask.deploy.cluster import dashboard_link; "
        "print(dashboard_link('127.0.0.1', 8787))")


def test_start_sends_dashboard_links_through_the_hub():
    link = run_start([sys.executable, "-c", LINK], prefix="/user/ada/")
    assert link == "/user/ada/proxy/8787/status"


def test_start_leaves_links_alone_outside_a_hub():
    unset = run_start([sys.executable, "-c", "import os; print(os.environ."
                       "get('MINIDASK_DASHBOARD__LINK', 'unset'))"])
    assert unset == "unset"
    assert run_start([sys.executable, "-c", LINK]) == \
        "http://127.0.0.1:8787/status"


def test_repo2docker_builds_from_the_binder_folder():
    pytest.importorskip("repo2docker")
    # --no-build writes the Dockerfile and stops: no Docker daemon needed.
    result = subprocess.run(
        [sys.executable, "-m", "repo2docker", "--no-build", str(ROOT)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    dockerfile = result.stdout
    assert "Building conda environment for python=3.11" in result.stderr
    assert '--file "binder/environment.yml"' in dockerfile
    assert '--file "environment.yml"' not in dockerfile
    assert "RUN ./binder/postBuild" in dockerfile
    assert 'R2D_ENTRYPOINT="${REPO_DIR}/binder/start"' in dockerfile
    assert "sshd" not in dockerfile.lower()
