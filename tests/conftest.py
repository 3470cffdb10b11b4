"""Test tiers: tests/unit run anywhere; tests/kernel need root, bcc and BPF_PROG_TEST_RUN.
Kernel tests skip when those are missing, except in CI, where a skip would hide a failure."""
import os

import pytest


def kernel_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (Debian's python3-bpfcc; run scripts/setup)"
    return ""


def pytest_collection_modifyitems(config, items):
    why = kernel_missing()
    if not why:
        return
    kernel = [item for item in items if "tests/kernel" in str(item.fspath)]
    if kernel and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI must run the kernel tests, but this host {why}")
    for item in kernel:
        item.add_marker(pytest.mark.skip(reason=why))
