"""The kernel tests' programs: the layout they are built for, a pinned build as on a gateway,
and one packet through an entry on one CPU. (The session's loaded builds are the fixtures of
tests/fixtures/programs.py.)"""
import secrets
from contextlib import contextmanager
from pathlib import Path

from dataplane.layout import Layout

# Room for every policy the generators draw (tests assert they fit, never shrink them).
TEST_LAYOUT = Layout(max_rules=64, max_nodes=8192, max_classes=2048, max_port_tables=2048, port_slots=64,
                     max_services=8192, max_cands=48, max_idents=512, who_words=2, sport_words=1,
                     max_src_hash=512)
XDP_DROP, XDP_PASS = 1, 2      # the XDP return values a test run reports


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
