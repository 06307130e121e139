"""The conda environment and pyproject.toml must install the same packages."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # where conda-forge names a package differently from PyPI


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    # tomli only backports tomllib to Python 3.10, which conda users get from the environment's Python.
    names = {requirement_name(r) for r in requirements if "python_version" not in r}
    return {CONDA_NAMES.get(name, name) for name in names}


def conda_packages() -> set[str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = {requirement_name(d) for d in environment["dependencies"] if isinstance(d, str)}
    return names - {"python", "pip"}


def test_conda_matches_pyproject():
    assert conda_packages() == pyproject_packages()


def test_conda_installs_labutils_with_pip():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert pip_sections == [["-e .[dev]"]]
