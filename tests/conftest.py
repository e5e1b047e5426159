from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# a shell that sourced .serve/env points MLflow at a running server: the tests use their own stores
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("STREAMAVATAR_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# ../shared (fixtures, Light-ASD weights) stays reachable from temporary clones of the project
os.environ.setdefault("STREAMAVATAR_SHARED", str(REPO.parent / "shared"))


def tool_env(root: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["STREAMAVATAR_ROOT"] = str(root)
    env["PREFECT_HOME"] = str(root / ".prefect")
    return env


def make_clone(dest: Path, source: Path = REPO) -> Path:
    """A temporary project checkout: ``source``'s files (tracked and new, not ignored: no data, no DVC cache) in
    a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=source,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = source / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture
def clone(tmp_path) -> Path:
    return make_clone(tmp_path / "project")


@pytest.fixture
def repo_root() -> Path:
    return REPO


def shared_path(*parts: str) -> Path:
    """A file under ../shared (or $STREAMAVATAR_SHARED); the test is skipped, saying why, when it is absent."""
    base = Path(os.environ.get("STREAMAVATAR_SHARED", REPO.parent / "shared"))
    path = base.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared fixtures beside the checkout, or $STREAMAVATAR_SHARED)")
    return path
