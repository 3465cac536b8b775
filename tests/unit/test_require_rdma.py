"""tests/conftest.py: with RDMAPROXY_REQUIRE_RDMA=1 no kind of skip passes as a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SKIPPING_TESTS = '''
import pytest

@pytest.mark.skip(reason="by mark")
def test_marked(): pass

@pytest.mark.skipif(True, reason="by skipif")
def test_skipif(): pass

@pytest.fixture
def no_device():
    pytest.skip("by fixture")

def test_fixture(no_device): pass
'''

SKIPPING_MODULE = '''
import pytest
pytest.importorskip("no_such_module_for_rdmaproxy")

def test_never_collected(): pass
'''


def run_pytest(tmp_path: Path, module: str, require: bool) -> subprocess.CompletedProcess[str]:
    shutil.copy(Path(__file__).parent.parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skipping.py").write_text(module)
    env = dict(os.environ)
    env.pop("RDMAPROXY_REQUIRE_RDMA", None)
    if require:
        env["RDMAPROXY_REQUIRE_RDMA"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_skips_fail_when_rdma_is_required(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, SKIPPING_TESTS, require=True)
    assert done.returncode != 0, done.stdout
    for reason in ("by mark", "by skipif", "by fixture"):
        assert f"does not allow: Skipped: {reason}" in done.stdout, done.stdout
    assert "skipped" not in done.stdout.splitlines()[-1], done.stdout


def test_a_module_skip_fails_when_rdma_is_required(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, SKIPPING_MODULE, require=True)
    assert done.returncode != 0, done.stdout
    assert "RDMAPROXY_REQUIRE_RDMA=1 does not allow" in done.stdout, done.stdout
    assert "no_such_module_for_rdmaproxy" in done.stdout


def test_skips_stay_skips_otherwise(tmp_path: Path) -> None:
    done = run_pytest(tmp_path, SKIPPING_TESTS, require=False)
    assert done.returncode == 0, done.stdout
    assert "3 skipped" in done.stdout
