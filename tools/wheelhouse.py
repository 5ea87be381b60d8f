"""Offline install of mitosis-edge on a lab box without internet: a wheelhouse built on a connected machine.

    python tools/wheelhouse.py freeze                 # deploy/constraints.txt from this (tested) environment
    python tools/wheelhouse.py download DIR           # connected machine: the project's wheel and every dependency
    python tools/wheelhouse.py install DIR VENV       # the box: a new virtual environment from DIR only

`download` is ``pip wheel --no-deps`` of the project plus ``pip download -c deploy/constraints.txt``
(binary wheels for this platform and Python); `install` is ``python -m venv`` plus ``pip install
--no-index --find-links DIR -c constraints.txt mitosis-edge``, so pip never reaches an index and
installs exactly the tested versions. docs/deployment.md ("Offline install") gives the same steps
as plain pip commands; tests/test_wheelhouse.py runs `install` from a wheelhouse built here.
"""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
PROJECT = "mitosis-edge"
HEADER = (
    "# Versions mitosis-edge was tested with (its dependencies, and theirs), for an offline install:\n"
    "#   pip install --no-index --find-links WHEELHOUSE -c constraints.txt mitosis-edge\n"
    "# Written by `python tools/wheelhouse.py freeze` from the environment the test suite passed in.\n"
)


def dependency_closure(project: str = PROJECT) -> dict[str, str]:
    """Every installed distribution the project needs (with the extras its requirements name, e.g.
    pyvips[binary]; not the project's own extras), name -> version, the project left out."""
    found: dict[str, str] = {}
    todo = _checkout_requirements() if project == PROJECT else _requirements(project, ())
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            found[name] = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            missing = f"{requirement.name} (needed by {project}) is not installed: pip install -e . first"
            raise SystemExit(missing) from None
        todo += _requirements(requirement.name, tuple(requirement.extras))
    return dict(sorted(found.items()))


def _checkout_requirements() -> list[Requirement]:
    """install_requires of this checkout's setup.cfg (the installed metadata may be of another checkout)."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = parser.get("options", "install_requires", fallback="").splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def _requirements(distribution: str, extras: tuple[str, ...]) -> list[Requirement]:
    """A distribution's requirements that apply without extras or with one of ``extras``."""
    kept = []
    for text in metadata.requires(distribution) or ():
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
            kept.append(requirement)
    return kept


def freeze(path: Path = CONSTRAINTS) -> Path:
    lines = [f"{name}=={version}" for name, version in dependency_closure().items()]
    path.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_project_wheel(folder: Path) -> Path:
    """The project's own wheel, built from this checkout without reaching an index."""
    folder.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(folder), str(ROOT))
    return next(folder.glob("mitosis_edge-*.whl"))


def download(folder: Path) -> None:
    build_project_wheel(folder)
    _pip("download", "--only-binary=:all:", "--dest", str(folder), "-c", str(CONSTRAINTS), *_pins())
    shutil.copy(CONSTRAINTS, folder / "constraints.txt")


def install(folder: Path, venv: Path, *, system_site_packages: bool = False) -> Path:
    """A new virtual environment at ``venv`` with mitosis-edge from ``folder`` alone; returns its python."""
    args = [sys.executable, "-m", "venv", str(venv)]
    if system_site_packages:  # the test: dependencies already here, the project and its pins checked offline
        args.insert(3, "--system-site-packages")
    subprocess.run(args, check=True)
    python = venv / "bin" / "python"
    constraints = folder / "constraints.txt" if (folder / "constraints.txt").exists() else CONSTRAINTS
    offline = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(folder),
               "--disable-pip-version-check", "--quiet"]
    if system_site_packages:  # the project itself from the wheelhouse, not the copy the system site may hold
        subprocess.run([*offline, "--no-deps", "--ignore-installed", PROJECT], check=True)
    subprocess.run([*offline, "-c", str(constraints), PROJECT], check=True)
    if not system_site_packages:  # (with them, unrelated packages of the system would be checked too)
        subprocess.run([str(python), "-m", "pip", "check", "--disable-pip-version-check"], check=True)
    return python


def _pins() -> list[str]:
    return [line for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--quiet"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("freeze", help="write deploy/constraints.txt from this environment")
    d = sub.add_parser("download", help="connected machine: the project's wheel and its dependencies into DIR")
    d.add_argument("folder", type=Path, help="the wheelhouse folder")
    i = sub.add_parser("install", help="offline box: a new virtual environment from DIR alone")
    i.add_argument("folder", type=Path, help="the wheelhouse folder")
    i.add_argument("venv", type=Path, help="the new virtual environment, e.g. /opt/mitosis-edge")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        print(f"wrote {freeze()}")
    elif args.command == "download":
        download(args.folder)
        print(f"wheelhouse {args.folder}: copy it and deploy/constraints.txt to the box")
    else:
        python = install(args.folder, args.venv)
        print(f"installed: {python.parent / 'mitosis-edge'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
