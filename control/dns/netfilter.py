"""The gateway's own iptables chain that sends DNS to the slow path's NFQUEUE.

The kernel here has the xtables NFQUEUE target and not nftables' queue (HOST-NOTES), so the
rules are iptables(-legacy) rules, in a chain of the gateway's own, `ztdns-INTERFACE` in the
mangle table, jumped to from FORWARD. For each resolver R (ip6tables for IPv6 ones):

    -i INTERFACE -d R -p udp|tcp --dport 53   a device's question on its way to R
    -o INTERFACE -s R -p udp|tcp --sport 53   R's answer on its way to a device

both to queue NUM with --queue-bypass. They match every TCP segment of those flows, SYNs
included: the device's SYN and the resolver's SYN-ACK are where streams.py starts following a
connection (without them it teaches nothing). With no slow path reading the queue (stopped, crashed,
starting), the packet passes unqueued; with the queue full, it passes too (the slow path binds
the queue fail-open: failopen.py), and an answer then teaches nothing:
a connection to its name is blocked and logged as such, never allowed. Questions only pass
the ingress program when the policy allows them; answers only pass the connector-side
program as replies of flows it allowed. The chain is made at start (after removing one left
by a crashed gateway) and removed at stop and by teardown.
"""
from __future__ import annotations

import logging
import shutil
import subprocess

from ..errors import KernelError

log = logging.getLogger("ztgate.dns")
TABLE = "mangle"
TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}
WAIT = "5"                    # seconds an iptables call waits for the xtables lock


def chain_name(interface: str) -> str:
    return f"ztdns-{interface}"          # at most 6 + 15 characters: within xtables' 28


def _tool(version: int) -> str:
    found = shutil.which(TOOLS[version])
    if not found:
        raise KernelError(f"{TOOLS[version]} is not installed (Debian: iptables): the DNS slow path needs it")
    return found


def _run(version: int, *args: str, check: bool = True) -> bool:
    r = _call(version, *args)
    if check and r.returncode != 0:
        raise KernelError(f"{TOOLS[version]} -t {TABLE} {' '.join(args)}: {r.stderr.strip()}")
    return r.returncode == 0


def _call(version: int, *args: str) -> subprocess.CompletedProcess:
    """One iptables call, waiting at most WAIT seconds for the xtables lock (another tool may
    hold it: then the call fails, and says so)."""
    return subprocess.run([_tool(version), "-w", WAIT, "-t", TABLE, *args], capture_output=True, text=True)


def rules(interface: str, resolvers: tuple, queue: int, version: int) -> list[list[str]]:
    target = ["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]
    out = []
    for r in (r for r in resolvers if r.version == version):
        for proto in ("udp", "tcp"):
            out.append(["-i", interface, "-d", str(r), "-p", proto, "--dport", "53", *target])
            out.append(["-o", interface, "-s", str(r), "-p", proto, "--sport", "53", *target])
    return out


def install(interface: str, resolvers: tuple, queue: int) -> None:
    """The chain with its rules, then the jump to it: whole, or (on an error) not at all."""
    remove(interface)
    chain = chain_name(interface)
    try:
        for version in (4, 6):
            wanted = rules(interface, resolvers, queue, version)
            if not wanted:
                continue
            _run(version, "-N", chain)
            for rule in wanted:
                _run(version, "-A", chain, *rule)
            _run(version, "-I", "FORWARD", "-j", chain)
    except BaseException:
        remove(interface)
        raise
    log.info("DNS of resolvers %s queued to NFQUEUE %d (chain %s)", ", ".join(map(str, resolvers)), queue, chain)


def remove(interface: str) -> bool:
    """Remove the chain and its jump, in both families, if there. True if anything was. What
    cannot be removed (the xtables lock held past WAIT, the chain still referenced) is logged
    as an error naming the command and what iptables said; the next start removes it again
    before making the chain anew, and refuses to start the slow path if it still cannot."""
    chain, found, failed = chain_name(interface), False, []
    for version in (4, 6):
        if not shutil.which(TOOLS[version]):
            continue
        while _run(version, "-D", "FORWARD", "-j", chain, check=False):
            found = True
        if _run(version, "-F", chain, check=False):
            found = True
            r = _call(version, "-X", chain)
            if r.returncode != 0:
                failed.append(f"{TOOLS[version]} -X {chain}: {r.stderr.strip()}")
        left = _call(version, "-S", chain)
        state = chain_state(left.returncode, left.stderr)
        if state == "there":
            found = True
            failed.append(f"{TOOLS[version]} -t {TABLE} -S {chain}: the chain is still there")
        elif state == "unknown":
            failed.append(f"{TOOLS[version]} -t {TABLE} -S {chain}: cannot tell whether the chain is gone: "
                          f"{left.stderr.strip()}")
    if failed:
        log.error("the DNS slow path's chain %s could not be removed: %s. Answers still go to its queue; with "
                  "no gateway reading it they pass unlearned (--queue-bypass). The next start removes it again "
                  "(or: ztgate gateway teardown)", chain, "; ".join(failed))
    return found


def chain_state(returncode: int, stderr: str) -> str:
    """What `iptables -S CHAIN` said: "there"; "gone" (no such chain, or no such table: e.g.
    ip6tables-legacy on a kernel without ip6table_mangle, where no chain can be); "unknown"
    (anything else: the xtables lock held past WAIT, ...)."""
    if returncode == 0:
        return "there"
    if "No chain" in stderr or "Table does not exist" in stderr:
        return "gone"
    return "unknown"


def present(interface: str, version: int = 4) -> bool:
    return bool(shutil.which(TOOLS[version])) and _run(version, "-S", chain_name(interface), check=False)
