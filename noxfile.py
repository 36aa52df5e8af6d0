"""The Django x Python test matrix (`make matrix`, or `.venv/bin/nox -s unit` for the fast part).

`unit`: the unit and contract tests (everything but the e2e and browser tests, a few minutes) on
every supported pair: Django 5.2 on Python 3.11 and 3.12, Django 6.0 and 6.1 on Python 3.12 and
3.13. `full`: the whole suite on the default pair (Django 5.2, Python 3.11), as `make test` runs it.

Interpreters come from pyenv's versions directory (`$PYENV_ROOT/versions`, default
`~/.pyenv/versions`) or PATH; nothing is downloaded. A pair whose interpreter is missing is
skipped with a message naming it, also on CI (nox would fail it there by default).
Extra arguments go to pytest: `nox -s unit -- -k pool`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

# (Python, Django) pairs, the default one first.
PAIRS = [
    ("3.11", "5.2"),
    ("3.12", "5.2"),
    ("3.12", "6.0"),
    ("3.13", "6.0"),
    ("3.12", "6.1"),
    ("3.13", "6.1"),
]
DEFAULT_PYTHON, DEFAULT_DJANGO = PAIRS[0]
# The peer suite (tests/test_peer_suite.py) runs once, in `make test`: its expected differences are
# those of the default pair.
FAST_TESTS = ["-m", "not e2e and not browser and not peer"]

nox.options.sessions = ["unit"]
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"


def _put_pyenv_versions_on_path() -> None:
    """Put each pyenv Python (the newest patch of each X.Y) first on PATH, so nox finds
    `python3.12` there: pyenv's shims answer only for the versions a project selected."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found: dict[str, Path] = {}
    for bin_dir in sorted(versions.glob("3.*/bin"), key=lambda p: _version_key(p.parent.name)):
        major_minor = ".".join(bin_dir.parent.name.split(".")[:2])
        if (bin_dir / f"python{major_minor}").exists():
            found[major_minor] = bin_dir
    path = [str(found[v]) for v in sorted({p for p, _ in PAIRS}) if v in found]
    os.environ["PATH"] = os.pathsep.join([*path, os.environ.get("PATH", "")])
    for python in sorted({p for p, _ in PAIRS}):
        if python not in found and shutil.which(f"python{python}") is None:
            print(
                f"nox: no Python {python} under {versions} or on PATH: "
                f"the pairs on Python {python} will be skipped"
            )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


_put_pyenv_versions_on_path()


def _install(session: nox.Session, django: str) -> None:
    packages = ["-e", ".[test]", f"Django~={django}.0"]
    if int(django.split(".")[0]) < 6:
        # django.tasks is Django 6's: 5.2 needs the backport on every Python (the `tasks` extra's
        # marker can only test Python's version).
        packages.append("django-tasks>=0.12")
    session.install(*packages)
    session.run("python", "--version")
    session.run("python", "-m", "django", "--version")


@nox.session
@nox.parametrize(("python", "django"), PAIRS, ids=[f"py{p}-dj{d}" for p, d in PAIRS])
def unit(session: nox.Session, django: str) -> None:
    """The unit and contract tests on one (Python, Django) pair."""
    _install(session, django)
    session.run("python", "-m", "pytest", *FAST_TESTS, *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def full(session: nox.Session) -> None:
    """The whole suite (e2e and browser tests too) on the default pair."""
    _install(session, DEFAULT_DJANGO)
    session.run("scripts/ensure-chromium", external=True)
    session.run("python", "-m", "pytest", *session.posargs)
