"""Tests that need a program from the system (promtool, chromium): present, or a clear verdict.

Under CI (`CI` set, as `.ci/run` is run) a missing program fails the test: `.ci/run` installs
it, so its absence is a broken setup, never a reason to pass quietly. Elsewhere the test is
skipped with the reason and the package that brings the program.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_executable(name: str, package: str) -> str:
    """The path of `name` on PATH; otherwise fail under CI, skip elsewhere."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} not found: install Debian's {package} package (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; under CI this test must run")
    pytest.skip(reason)
