"""tools/lockfile.py: the lock is read as written, floors come from pyproject's lower bounds, and an
environment that differs from the lock is reported package by package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lockfile():
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "tools" / "lockfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PYPROJECT = """
[project]
name = "demo"
dependencies = ["torch>=2.8", "numpy>=1.26,<3", "PyYAML >= 6.0"]
[project.optional-dependencies]
vision = ["efficientnet-lite-pytorch>=0.1.0"]
test = ["pytest"]
"""


def test_floors_pin_every_lower_bound(lockfile, tmp_path, capsys):
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT)
    assert lockfile.main(["floors", str(path), "--extras", "vision", "--skip", "torch"]) == 0
    assert capsys.readouterr().out.split() == ["numpy==1.26", "PyYAML==6.0", "efficientnet-lite-pytorch==0.1.0"]


def test_a_dependency_without_a_floor_is_refused(lockfile, tmp_path, capsys):
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT)
    assert lockfile.main(["floors", str(path), "--extras", "test"]) == 1
    assert "no lower bound declared for pytest" in capsys.readouterr().err


def test_the_project_declares_a_floor_for_every_runtime_dependency(lockfile, capsys):
    assert lockfile.main(["floors", str(ROOT / "pyproject.toml"), "--extras", "vision", "datasets"]) == 0


def test_lock_names_are_canonical_and_local_builds_match_their_release(lockfile, tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# comment\nPyYAML==6.0.3\ntyping_extensions==4.15.0  # why\n\ntorch==2.13.0\n")
    assert lockfile.read_lock(lock) == {"pyyaml": "6.0.3", "typing-extensions": "4.15.0", "torch": "2.13.0"}
    assert lockfile.public_version("2.13.0+cpu") == "2.13.0"


def test_check_reports_each_difference(lockfile, tmp_path, monkeypatch, capsys):
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6\npyyaml==6.0.3\ntorch==2.13.0\n")
    installed = {"numpy": "2.4.6", "pyyaml": "6.0.2", "torch": "2.13.0+cpu", "rich": "14.0.0"}
    monkeypatch.setattr(lockfile, "installed_packages", lambda python: installed)
    assert lockfile.main(["check", str(lock), "--python", sys.executable]) == 1
    err = capsys.readouterr().err
    assert "pyyaml: locked 6.0.3, installed 6.0.2" in err and "rich: installed 14.0.0, not in the lock" in err
    assert "numpy" not in err and "torch" not in err
    installed.update(pyyaml="6.0.3")
    del installed["rich"]
    assert lockfile.main(["check", str(lock), "--python", sys.executable]) == 0


def test_the_committed_lock_pins_torch_and_the_test_tools(lockfile):
    pins = lockfile.read_lock(ROOT / "requirements.lock")
    assert pins["torch"] == "2.13.0" and pins["mergekit"] == "0.1.5" and "transformers" in pins
    assert "layermerge" not in pins
