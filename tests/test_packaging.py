"""The installed package: a built wheel's files and its console script."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(out)], check=True,
                   capture_output=True)
    (path,) = out.glob("eenet-*.whl")
    return path


@pytest.mark.slow
class TestWheel:
    def test_only_the_eenet_package_is_installed(self, wheel):
        names = zipfile.ZipFile(wheel).namelist()
        top = {n.split("/")[0] for n in names if not n.startswith("eenet-")}
        assert top == {"eenet"}, top  # no top-level cli.py (or anything else) in site-packages
        assert "eenet/__main__.py" in names and "eenet/cli/__init__.py" in names
        assert {"eenet/examples/fashion_mnist_cnn4.pt",
                "eenet/examples/fashion_mnist_cnn6.pt"} <= set(names)
        assert not any("/tests/" in n or n.startswith("tests/") for n in names)

    def test_console_script_points_into_the_package(self, wheel):
        with zipfile.ZipFile(wheel) as zf:
            (entry,) = [n for n in zf.namelist() if n.endswith("entry_points.txt")]
            text = zf.read(entry).decode()
        assert "eenet = eenet.cli:main" in text


def test_python_m_eenet_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "eenet", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("eenet, version")
