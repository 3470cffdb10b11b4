"""One loaded program per layout for the whole session: building it takes a second, and every
test refills its maps, exactly as a policy change would."""
import secrets
from contextlib import contextmanager
from pathlib import Path

import pytest

from dataplane.layout import Layout

# Room for every policy the generators draw (tests assert they fit, never shrink them).
TEST_LAYOUT = Layout(max_rules=64, max_nodes=8192, max_classes=2048, max_port_tables=2048, port_slots=64,
                     max_services=8192, max_cands=48, max_idents=512, who_words=2, sport_words=1,
                     max_src_hash=512)


def _program(layout):
    from dataplane.program import Program

    program = Program(layout)
    yield program
    program.close()


@pytest.fixture(scope="session")
def program():
    yield from _program(TEST_LAYOUT)


@pytest.fixture(scope="session")
def eth_program():
    from dataclasses import replace

    yield from _program(replace(TEST_LAYOUT, ethernet=True))


@contextmanager
def pinned_program(name: str, layout: Layout = TEST_LAYOUT):
    """A program whose shared maps (conntrack among them) are pinned, as on a gateway: they
    outlive each load() of new tables. The pins go afterwards, also when a test failed."""
    from dataplane.libbpf import unpin_all
    from dataplane.program import Program

    pin_dir = Path("/sys/fs/bpf") / f"zt-test-{name}-{secrets.token_hex(4)}"
    try:
        with Program(layout, pin_dir=pin_dir) as prog:
            yield prog
    finally:
        unpin_all(pin_dir)


def run_on_one_cpu(program, pkt, reply: bool = False):
    """One packet through the ingress (or, with reply, the connector-side) entry, on one CPU."""
    with program.on_one_cpu() as cpu:
        return program.run(bytes(pkt), cpu=cpu, reply=reply)
