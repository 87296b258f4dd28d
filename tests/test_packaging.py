"""Packaging (issue 11 §4): the metadata in pyproject.toml, one version, the
files an sdist and a wheel carry, the Python versions .ci/run tests, and
dask's ``dask.distributed`` module, which imports *this* package (both are
named ``distributed``; see docs/install.md).
"""

import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from contextlib import redirect_stdout

import pytest

import distributed
from distributed.utils_test import inc

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def ci_pythons():
    """The (oldest, newest) Python versions .ci/run tests, from its
    ``OLDEST_PYTHON=`` and ``NEWEST_PYTHON=`` lines."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        text = f.read()
    return tuple(re.search(r"^%s_PYTHON=(\d+\.\d+)" % which, text, re.M).group(1)
                 for which in ("OLDEST", "NEWEST"))


# --- metadata ------------------------------------------------------------


@pytest.mark.pure
def test_version_lives_in_one_place():
    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "distributed.__version__"}
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "version" not in f.read()
    assert re.fullmatch(r"\d+\.\d+\.\d+", distributed.__version__)


@pytest.mark.pure
def test_requires_python_is_what_ci_tests():
    oldest, newest = ci_pythons()
    project = pyproject()["project"]
    assert project["requires-python"] == ">=" + oldest
    listed = {c.rsplit(":: ", 1)[1] for c in project["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    first, last = (int(v.split(".")[1]) for v in (oldest, newest))
    assert listed == {"3.%d" % minor for minor in range(first, last + 1)}
    assert sys.version_info[:2] >= tuple(map(int, oldest.split(".")))


@pytest.mark.pure
def test_commands_resolve_to_functions():
    scripts = pyproject()["project"]["scripts"]
    assert {"dcenter", "dworker"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def self_extras(requirements):
    """The extras of this package that ``requirements`` name
    (``distributed[a,b]``)."""
    found = set()
    for r in requirements:
        m = re.fullmatch(r"distributed\[([\w,]+)\]", r)
        if m:
            found.update(m.group(1).split(","))
    return found


@pytest.mark.pure
def test_extras():
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"dask", "dashboard", "notebook", "ssh", "test", "all"} <= set(extras)
    # [all] is every optional part; [test] installs every one that has
    # something to install (the tests use them all)
    assert self_extras(extras["all"]) == set(extras) - {"test", "all"}
    assert self_extras(extras["test"]) >= {name for name in extras
                                           if extras[name] and name not in ("test", "all")}
    # dask's own `distributed` would replace this package
    requirements = [r for rs in extras.values() for r in rs]
    requirements += pyproject()["project"]["dependencies"]
    assert not [r for r in requirements if re.match(r"dask\[[^]]*distributed", r)]


@pytest.mark.pure
def test_license_is_bsd3():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("BSD 3-Clause License")
    assert "distributed developers" in text
    assert pyproject()["project"]["license"] == "BSD-3-Clause"


# --- what the sdist and the wheel carry ------------------------------------


def source_tree(dest):
    """Copy the files git tracks (or, outside git, the tree without
    virtual environments and caches) to ``dest``: a build writes its
    ``*.egg-info`` there, not into the worktree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             check=True, timeout=30).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = None
    if names is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".venv*", ".git", "__pycache__", "*.egg-info", "build", "dist"))
        return
    for name in names:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An sdist and a wheel built from a copy of the tree with the PEP 517
    hooks of the installed setuptools (no network): their paths."""
    import setuptools

    # pyproject.toml's SPDX `license` needs it; [test] installs it
    assert int(setuptools.__version__.split(".")[0]) >= 77, (
        "setuptools %s is too old to build: pip install -e '.[test]'" % setuptools.__version__)
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("dist")
    source_tree(str(src))
    return build(src, out, "build_sdist"), build(src, out, "build_wheel")


def build(src, out, hook):
    """Run one PEP 517 hook of setuptools in its own process (as frontends
    do: setuptools keeps state between hooks); the path it built."""
    # setuptools logs to stdout too: the name comes on the line marked BUILT
    code = ("import sys; from setuptools import build_meta; "
            "print('BUILT', getattr(build_meta, sys.argv[1])(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, hook, str(out)], cwd=str(src),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("BUILT ")]
    return str(out / line.split()[1])


@pytest.mark.processes
def test_sdist_carries_docs_license_and_tests(built):
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames()}
        pkg_info = tar.extractfile(top + "/PKG-INFO").read().decode()
    docs = {"docs/" + n for n in os.listdir(os.path.join(ROOT, "docs"))
            if os.path.isfile(os.path.join(ROOT, "docs", n))}
    assert docs and docs <= names, docs - names
    assert {"LICENSE", "README.md", "pyproject.toml", "setup.py", "setup.cfg",
            "conftest.py", "tests/test_packaging.py", ".ci/run",
            "distributed/__init__.py",
            "distributed/dashboard/static/status.html"} <= names
    assert top == "distributed-" + distributed.__version__
    assert "\nVersion: %s\n" % distributed.__version__ in pkg_info
    assert "\nRequires-Python: >=%s\n" % ci_pythons()[0] in pkg_info


@pytest.mark.processes
def test_wheel_installs_code_commands_and_license(built):
    _, wheel = built
    info = "distributed-%s.dist-info/" % distributed.__version__
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(info + "entry_points.txt").decode()
        metadata = z.read(info + "METADATA").decode()
    assert "distributed/dashboard/static/dashboard.js" in names
    assert "distributed/cli/dcenter.py" in names
    assert info + "licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("docs/", "tests/"))]
    for name, target in pyproject()["project"]["scripts"].items():
        assert "%s = %s" % (name, target) in entry_points
    for extra in pyproject()["project"]["optional-dependencies"]:
        assert "Provides-Extra: %s\n" % extra in metadata


# --- dask's dask.distributed module imports this package -------------------


@pytest.mark.pure
def test_dask_distributed_is_ours():
    pytest.importorskip("dask")
    import dask.distributed

    from dask.distributed import Executor, progress, wait

    assert (Executor, wait, progress) == (
        distributed.Executor, distributed.wait, distributed.progress)
    # `from distributed import *` (what dask.distributed does) brings every
    # public name; the module's __getattr__ reaches the others
    for name in distributed.__all__:
        assert getattr(dask.distributed, name) is getattr(distributed, name)
    assert dask.distributed.LocalCluster is distributed.LocalCluster


@pytest.mark.pure
def test_dask_show_versions_reports_ours():
    pytest.importorskip("dask")
    from dask.utils import show_versions

    out = io.StringIO()
    with redirect_stdout(out):
        show_versions()
    assert json.loads(out.getvalue())["distributed"] == distributed.__version__


@pytest.mark.processes
def test_dask_distributed_wait_on_our_futures(e):
    pytest.importorskip("dask")
    import dask.base
    from dask.distributed import wait

    futures = e.map(inc, range(3))
    done, not_done = wait(futures, timeout=30)
    assert len(done) == 3 and not not_done
    # dask.base.wait, dask's compatibility alias, calls ours (it returns its
    # argument unchanged when it cannot import ours)
    f = e.submit(inc, 10)
    done, not_done = dask.base.wait(f, timeout=30)
    assert done == {f} and not not_done
    assert f.result(timeout=30) == 11


# -- what differs between the supported Pythons ------------------------------


@pytest.mark.pure
def test_wait_for_raises_the_builtin_timeout_error():
    """What an awaited ``result(timeout=)`` raises is ``TimeoutError`` on
    every Python: 3.10's ``asyncio.wait_for`` raises its own class, which
    ``except TimeoutError`` misses."""
    import asyncio

    from distributed.utils import wait_for

    async def main():
        with pytest.raises(TimeoutError) as info:
            await wait_for(asyncio.sleep(1), 0.01)
        assert type(info.value) is TimeoutError
        assert await wait_for(asyncio.sleep(0, "done"), 1) == "done"

    asyncio.run(main())
