"""Test tiers: tests/unit run anywhere; tests/kernel need root, bcc and BPF_PROG_TEST_RUN;
tests/net need root and WireGuard's userspace tools (they build namespaces and tunnels).
Such tests skip when those are missing, except in CI, where a skip would hide a failure.

Shared fixtures come from the plugin modules below (tests/fixtures/), shared constants and helper
functions from plain modules (tests/programs.py, tests/lab_cli.py, ...): no test module imports
another, nor a conftest."""
import os
import shutil

import pytest

pytest_plugins = ["tests.fixtures.programs", "tests.fixtures.lab", "tests.fixtures.idp"]


def kernel_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (Debian's python3-bpfcc; run scripts/setup)"
    return ""


def net_missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("wireguard-go", "wg", "wg-quick", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian's wireguard-go, wireguard-tools, util-linux; run scripts/setup)"
    return ""


TIERS = {"tests/kernel": kernel_missing, "tests/net": net_missing}


def pytest_collection_modifyitems(config, items):
    for tier, missing in TIERS.items():
        chosen = [item for item in items if f"{tier}/" in str(item.fspath)]
        why = missing() if chosen else ""
        if not why:
            continue
        if os.environ.get("CI") == "true":
            raise pytest.UsageError(f"CI must run the {tier} tests, but this host {why}")
        for item in chosen:
            item.add_marker(pytest.mark.skip(reason=why))
