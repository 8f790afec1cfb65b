"""
The installed artifact: the wheel holds the plugins (and no C{__init__.py}
that would shadow Twisted's), and in a fresh virtualenv C{twistd} finds both
the C{pop3srv} service and the C{passlib} checker.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the checkout."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (path,) = out.glob("pop3srv-*.whl")
    return path


def test_wheel_contents(wheel: Path) -> None:
    """Plugins are in the wheel; twisted/__init__.py, plugins/__init__.py and caches are not."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"twisted/plugins/pop3srv_tap.py", "twisted/plugins/pop3srv_cred.py"} <= names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(name.endswith("dropin.cache") for name in names)
    assert "pop3srv/py.typed" in names


def test_fresh_venv_finds_plugins(wheel: Path, tmp_path: Path) -> None:
    """After a plain install of the wheel, twistd lists pop3srv and its passlib checker."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    twistd = str(env_dir / "bin" / "twistd")
    help_text = subprocess.run(
        [twistd, "--help"], capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60
    ).stdout
    assert "pop3srv" in help_text
    auth = subprocess.run(
        [twistd, "pop3srv", "--help-auth"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=60,
    ).stdout
    assert "passlib" in auth
    assert (env_dir / "bin" / "pop3srv-passwd").exists()
