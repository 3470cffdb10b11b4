"""The gateway's kernel state: the policy build attached to the ingress interface, and the
two ways it changes.

- stage_swap() of a policy that differs from the one in force by a few rules (a rule add,
  remove, enable, disable or move): no compile. control/incremental.py changes the build in
  force where those rules touch it, writes only those rows into its bank not in force, and
  applying flips the bank (control/kernel_changes.py). A change it cannot take (hostnames, new
  source prefixes or source-port sets, identities changed, no room left) falls back to:
- stage_swap(): a new build of the whole policy. The model is compiled; when the tables fit
  the program in force, they are written into its bank not in force (only the entries that
  differ) and applying flips the bank with one store: no compiler run (ebpf/README.md,
  "Changes in place"). When they do not fit (and at start, which is how a restarted
  controller takes over), a new program is built, filled and attached in place of the old
  one in one netlink call. Either way every packet is decided wholly by the old policy or
  wholly by the new.
- stage_devices(): a device or a user changed. Only their source entries (and any new
  identity class) are written into the build in force: one atomic map write per address.

Both are staged before the store commits (compiling and sizing, which can fail, happen
there) and applied after it, so a crash leaves the kernel at the last committed state or
behind it, never ahead; start() catches up. The maps that outlive builds (ring buffer,
per-CPU state, conntrack, the epoch) are pinned and shared; see ebpf/README.md.

This is control/'s one door to the data plane: nothing else in control/ touches a dataplane
Program. The gateway, metrics, the probes and teardown ask Kernel (or the functions at the end
of this file) for flows, kills, counters, dry runs and pins.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

from dataplane.attach import attach, attached, detach
from dataplane.conntrack import SETTLE
from dataplane.errors import KernelError, ZtError
from dataplane.layout import POOL_BITS, Layout
from dataplane.libbpf import prog_id, unpin_all
from dataplane.mirrors import CT_CLOSING, CT_KILLED, CT_OPEN, IDENT_EXPIRED
from dataplane.pinned import forget_record
from dataplane.program import Program
from dataplane.testrun import RunResult

from .compiler import Tables, compile_policy
from .config import Config
from .incr_idents import forget_classes
from .incremental import Incremental
from .kernel_changes import RuleChanges
from .kernel_adopt import Adoption
from .kernel_names import LearnedNames
from .learned import Learned
from .model import Device, Identities, Policy

log = logging.getLogger("ztgate.kernel")
DEFAULT_RULE = "(default)"   # how counters and logs name decisions of default_action
CT_STATE_NAMES = {CT_OPEN: "open", CT_CLOSING: "closing", CT_KILLED: "killed"}   # a flow's state, as `ztgate flows` says it
KEEP_BUILDS = 4          # names of recent builds, for events that were in flight across a swap


def base_layout(config: Config) -> Layout:
    """The pools the kernel indexes by array (the 2^20-address blocks holding the config's
    pools) and the conntrack timeouts."""
    ct = dict(config.conntrack)
    lay = replace(Layout(), pool4_base=int(config.pool_ipv4.network_address) >> POOL_BITS << POOL_BITS,
                  ct_entries=ct["entries"], ct_tcp_seconds=ct["tcp"], ct_tcp_closing_seconds=ct["tcp_closing"], ct_udp_seconds=ct["udp"],
                  ct_icmp_seconds=ct["icmp"])
    if config.pool_ipv6 is not None:
        lay = replace(lay, pool6_base=int(config.pool_ipv6.network_address) >> POOL_BITS << POOL_BITS)
    return replace(lay, max_learned=max(lay.max_learned, learned_settings(config)["max_total"]))


def learned_settings(config: Config) -> dict:
    """Learned(...)'s bounds from the gateway config's `dns:` section (min_ttl, max_ttl,
    max_per_name, max_total, max_per_device), the defaults of spec/POLICY.md where it has none."""
    dns = getattr(config, "dns", None) or {}
    get = dns.get if isinstance(dns, dict) else lambda key, default: getattr(dns, key, default)
    return {"min_ttl": get("min_ttl", 60), "max_ttl": get("max_ttl", 86400),
            "max_per_name": get("max_per_name", 64), "max_total": get("max_total", 16384),
            "max_per_device": get("max_per_device", 1024)}


@dataclass
class Staged:
    """A kernel change made ready: apply() makes it take effect, discard() frees it unused."""

    apply: Callable[[], None]
    discard: Callable[[], None]


@dataclass
class Build:
    number: int
    program: Program
    tables: Tables
    compile_seconds: float
    load_seconds: float
    bank: int = 0          # the program's bank that holds it
    written: int = 0       # entries written into that bank (in place: only those that differed)


class Kernel(LearnedNames, RuleChanges, Adoption):
    def __init__(self, config: Config):
        self.config = config
        # the event cache that conntrack (zt_ct) replaced, pinned by gateways before it
        (Path(config.bpf_pin_dir) / "zt_flows").unlink(missing_ok=True)
        self.base = base_layout(config)
        self.build: Optional[Build] = None
        self.standby: Optional[Build] = None        # the build before, in the other bank (counters not carried yet)
        self.carried: dict[str, list[int]] = {}     # rule name -> [packets, bytes] of builds gone
        self.names: dict[int, Build] = {}            # recent builds by number
        self.reply_interfaces: list[str] = []        # connector interfaces: the build's reply entry
        self.learned = Learned(**learned_settings(config))   # addresses learned for names (the slow path)
        # Learning writes the build in force in place; a swap makes the new build's learned
        # addresses current and attaches it under this lock, so nothing learned is lost between.
        self.learned_lock = threading.Lock()
        self.inc: Optional[Incremental] = None      # the build in force, for rule changes without a compile
        self.inc_why = "no build in force"         # why there is none (said when a change compiles everything)

    # -----------------------------------------------------------------------------------------
    # changes: staged before the store commits (where they can still fail), applied after

    def stage_swap(self, identities: Identities, policy: Policy, number: int, forget: list = ()) -> Staged:
        """Compile, build and fill a whole new build; applying it attaches it in place of the
        one in force (one netlink call: no packet sees half of either), and forgets the flows
        of the FORGET addresses (they changed hands) before the epoch moves."""
        started = time.perf_counter()
        if self.inc is not None:
            staged = self._stage_change(identities, policy, number, forget)
            if staged is not None:
                return staged
        elif self.build is not None:
            log.info("build %d: %s: the whole policy compiled (not only the rules that changed)", number, self.inc_why)
        with self.learned_lock:
            learned = self.learned.by_address()
        tables = compile_policy(policy, identities, self.base, learned)
        compiled = time.perf_counter()
        if self.build is None:      # a restarted controller: the pinned program, if it may be adopted
            staged = self._stage_adopted(tables, number, forget, compiled - started, (policy, identities))
            if staged is not None:
                return staged
        if self.build is not None:
            short = self.build.program.layout.shortfalls(tables.need)
            if not short and self.build.program.policy_tables.banks == 2:
                return self._stage_in_place(tables, number, forget, compiled - started, (policy, identities))
            log.info("build %d does not fit build %d's program (%s): falling back to a full build",
                     number, self.build.number, "; ".join(short) or "one bank")
        program = Program(tables.need.with_headroom(), pin_dir=self.config.bpf_pin_dir, build=number)
        try:
            program.load(tables)
        except BaseException:
            program.close()
            raise
        new = Build(number, program, tables, compiled - started, time.perf_counter() - compiled)

        def apply() -> None:
            self._switch(new, forget)
            self._begin_changes(new, policy, identities)
        return Staged(apply, program.close)

    def _stage_in_place(self, tables: Tables, number: int, forget: list, compile_seconds: float,
                        basis: Optional[tuple] = None) -> Staged:
        """TABLES into the bank not in force of the program in force; applying flips it (and,
        with BASIS, the policy and identities compiled, rule changes start from it)."""
        program = self.build.program
        # that bank's counters are the build before this one's: kept by name before they go
        self._carry(self.standby)
        self.standby = None
        started = time.perf_counter()
        written = program.stage(tables)
        new = Build(number, program, tables, compile_seconds, time.perf_counter() - started, 1 - program.bank, written)

        def apply() -> None:
            self._flip(new, forget)
            if basis is not None:
                self._begin_changes(new, *basis)
        return Staged(apply, lambda: None)

    def _flip(self, new: Build, forget: list = ()) -> None:
        """Put NEW's bank in force: one store. No settle before the epoch moves (unlike a swap):
        a packet reads the epoch, then the bank, so one that reads the new epoch is decided by
        the new bank, and one decided by the old bank carries the old epoch into conntrack."""
        program = new.program
        with self.learned_lock:
            self._catch_up_learned(new)
            program.flip(new.number)
            old, self.build, self.standby = self.build, new, self.build
        self._remember(new)
        if forget:
            program.forget_flows(forget)
        program.next_epoch()
        log.info("build %d in place of build %d (bank %d): compile %.3f s, %d entries written in %.3f s",
                 new.number, old.number, new.bank, new.compile_seconds, new.written, new.load_seconds)
        # A connector interface made since (a rebuild after a failed step makes them again)
        # gets the program's connector side, as a swap would give it.
        failed = self._attach_reply_sides(program, "has no connector-side program", only_missing=True)
        if failed:
            raise KernelError(f"build {new.number} is in force on {self.config.interface}, but: {'; '.join(failed)}")

    def _attach_reply_sides(self, program, fault: str, only_missing: bool = False) -> list[str]:
        """PROGRAM's connector side on the connector interfaces (not running it, if ONLY_MISSING): what failed, logged."""
        failed = []
        reply_id = prog_id(program.reply_fn.fd) if only_missing else None
        for ifname in self.reply_interfaces:
            if only_missing and program_on(ifname) == reply_id:
                continue
            try:
                attach(program, ifname, self.config.xdp_mode, reply=True)
            except KernelError as e:
                log.error("connector interface %s %s: %s", ifname, fault, e)
                failed.append(str(e))
        return failed

    def _remember(self, new: Build) -> None:
        self.names[new.number] = new
        for n in sorted(self.names)[:-KEEP_BUILDS]:
            del self.names[n]

    def _carry(self, build: Optional[Build]) -> Optional[list]:
        """A build's counters join the running totals, by rule name: the rule ids that counted
        (None: no build)."""
        if build is None:
            return None
        counts = build.program.rule_counters(build.bank)
        names = build.tables.rule_names
        for rid, (packets, nbytes) in counts.items():
            if rid > len(names):
                continue
            total = self.carried.setdefault(names[rid - 1] if rid else DEFAULT_RULE, [0, 0])
            total[0] += packets
            total[1] += nbytes
        return list(counts)

    def _switch(self, new: Build, forget: list = ()) -> None:
        """Attach NEW in place of the build in force. Once it is on the ingress interface it is
        the build in force, whatever fails after (a connector's interface gone, a pin): later
        changes must write into the tables that decide, and the epoch must move."""
        if self.build is None:
            # The first build of this controller: the pinned epoch is another controller's
            # (an older version's may even read it otherwise). Moved on once before the attach,
            # the program in force decides every flow again by its own tables; none is trusted
            # by an epoch from an unknown past.
            new.program.next_epoch()
        with self.learned_lock:
            self._catch_up_learned(new)
            try:
                attach(new.program, self.config.interface, self.config.xdp_mode)
            except BaseException:
                new.program.close()
                raise
            old, self.build = self.build, new
        self._remember(new)
        # an interface that cannot take it keeps the old build's program (the old tables): said loudly
        failed = self._attach_reply_sides(new.program, "keeps the previous build's program")
        if forget:
            new.program.forget_flows(forget)
        self._next_epoch(new.program)
        try:
            new.program.pin(self.config.bpf_pin_dir)
        except (KernelError, OSError) as e:
            log.error("build %d is attached but not pinned: %s", new.number, e)
            failed.append(f"pin: {e}")
        log.info("build %d attached to %s: compile %.2f s, load %.2f s", new.number, self.config.interface,
                 new.compile_seconds, new.load_seconds)
        if old is not None:
            # Counters of the build going away join the running totals; its tables are freed
            # (events it emitted keep their names: self.names holds the tables, not the maps).
            # A connector interface that could not take the new build keeps the old program
            # alive (the attachment holds it) until it is replaced or removed.
            self._carry(old)
            self._carry(self.standby)
            self.standby = None
            old.program.close()
        if failed:
            raise KernelError(f"build {new.number} is in force on {self.config.interface}, but: {'; '.join(failed)}")

    def stage_devices(self, identities: Identities, policy: Policy, devices: list[Device]) -> Staged:
        """Only these devices' source entries (as `identities` has them now), written into the
        build in force; a whole new build if its identity classes would not fit."""
        build = self.build
        sources = build.tables.sources
        known = len(sources.idents.values)
        entries = sources.entries(identities, devices)
        added = len(sources.idents.values) - known
        if known + added + 1 > build.program.layout.max_idents:
            forget_classes(sources, known)
            log.info("identity classes outgrew build %d: staging a new build", build.number)
            return self.stage_swap(identities, policy, build.number + 1)
        rows = [sources.ident_row(i) for i in range(known + 1, known + added + 1)]

        def apply() -> None:
            if rows:   # the new classes first: no source points at a class not yet written
                build.program.set_idents(known + 1, rows)
            build.program.set_sources(entries)
            if self.inc is not None:
                self.inc.devices_written(identities, entries, range(known + 1, known + added + 1))
            # The epoch at once (no settle, unlike a swap: a packet reads the epoch before the
            # sources, so one that reads the new epoch sees the new sources). Then a device's
            # address may go to another device: its flows go with it.
            build.program.next_epoch()
            build.program.forget_flows(addr for addr, ident, _ in entries if not ident)
        return Staged(apply, lambda: forget_classes(sources, known))   # (not applied: in no bank)

    def expired_devices(self, devices: list[Device]) -> set[str]:
        """The names of these devices whose source entries in the build in force say their
        session is over (what the session clock has written already)."""
        program = self.build.program
        return {d.name for d in devices
                if all(ident == IDENT_EXPIRED for _, ident, _ in program.sources_of(d.addresses))}

    @staticmethod
    def _next_epoch(program: Program) -> None:
        """Conntrack's flows were allowed by the policy before this change: move the epoch on,
        and the connector side decides each flow again at its next reply. The program reads the
        epoch before any table, so a packet decided by the old tables carries the old epoch;
        the moment's wait covers one that entered the old program just before the change and
        had not yet read it (softirq: microseconds)."""
        time.sleep(SETTLE)
        program.next_epoch()

    def attach_reply(self, ifname: str) -> None:
        """Put the build's connector-side entry on IFNAME (kept on it across builds)."""
        attach(self.build.program, ifname, self.config.xdp_mode, reply=True)
        if ifname not in self.reply_interfaces:
            self.reply_interfaces.append(ifname)

    def detach_reply(self, ifname: str) -> None:
        if ifname in self.reply_interfaces:
            self.reply_interfaces.remove(ifname)
        try:
            detach(ifname)
        except KernelError:
            pass      # the interface is gone already

    # -----------------------------------------------------------------------------------------
    # reading

    def rule_name(self, build: int, rule: int) -> Optional[str]:
        b = self.names.get(build)
        if b is None or not 0 < rule <= len(b.tables.rule_names):
            return None
        return b.tables.rule_names[rule - 1]

    def device_name(self, build: int, device: int) -> Optional[str]:
        b = self.names.get(build)
        if b is None or device <= 0:
            return None
        names = b.tables.sources.device_names
        return names[device - 1] if device <= len(names) else None

    def rule_hits(self) -> dict[str, tuple[int, int]]:
        """Rule name -> (packets, bytes) since this controller started."""
        out = {name: tuple(v) for name, v in self.carried.items()}
        for build in (self.standby, self.build):
            if build is None:
                continue
            for name, (packets, nbytes) in _named(build).items():
                p, b = out.get(name, (0, 0))
                out[name] = (p + packets, b + nbytes)
        return out

    def attachment(self) -> Optional[tuple[int, str]]:
        return attached(self.config.interface)

    def reason_counters(self) -> dict:
        """Reason -> (packets, bytes) of the build in force."""
        return self.build.program.reason_counters() if self.build else {}

    def events_lost(self) -> int:
        return self.build.program.events_lost() if self.build else 0

    def occupancy(self) -> dict:
        """Table name -> (entries in use, capacity) of the build in force."""
        return self.build.program.occupancy() if self.build else {}

    def trace(self, packet: bytes) -> tuple[RunResult, Optional[str]]:
        """One packet through the build in force, dry (no counter, event or flow): the
        kernel's result and the name of the rule that decided it."""
        build = self.build
        with build.program.on_one_cpu() as cpu:
            r = build.program.run(packet, cpu=cpu, dry=True)
        return r, build.tables.rule_names[r.rule - 1] if r.rule else None

    # -----------------------------------------------------------------------------------------
    # conntrack

    def flows(self) -> Iterator[dict]:
        """Every tracked flow as Program.flows() has it, its state by name (CT_STATE_NAMES)."""
        for f in self.build.program.flows():
            yield dict(f, state=CT_STATE_NAMES.get(f["state"], "?"))

    def kill_flow(self, version: int, proto: int, src, dst, sport: int, dport: int) -> bool:
        return self.build.program.kill_flow(version, proto, src, dst, sport, dport)

    def kill_flows(self, flows: list[tuple]) -> int:
        """Flows as (version, proto, src, dst, sport, dport): how many were killed."""
        return self.build.program.kill_flows(flows)

    def forget_flows_except(self, addresses: list) -> int:
        """Forget the flows of every source address but these: how many went."""
        return self.build.program.forget_flows_except(addresses)


def _named(build: Build) -> dict[str, tuple[int, int]]:
    """A build's per-rule counters by rule name (rule id 0: the default action)."""
    names = build.tables.rule_names
    return {(names[rid - 1] if rid else DEFAULT_RULE): v
            for rid, v in build.program.rule_counters(build.bank).items() if rid <= len(names)}


def program_on(ifname: str) -> Optional[int]:
    """The id of the XDP program on IFNAME; None if there is none, or no such interface."""
    try:
        found = attached(ifname)
    except ZtError:
        return None
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# programs outside the gateway: `ztgate dataplane verdicts`, the kernel tests, teardown

@contextmanager
def loaded(tables: Tables) -> Iterator[Program]:
    """A program built for TABLES and filled with them, attached to nothing; closed after."""
    with Program(tables.need.with_headroom()) as program:
        program.load(tables)
        yield program


def run_packets(program: Program, packets: list[bytes], repeat: int = 0) -> list[RunResult]:
    """Each packet through PROGRAM (BPF_PROG_TEST_RUN) on one CPU. Without REPEAT a dry run:
    each packet decided alone, as the first of its flow (no conntrack, no fragment tracking);
    with it, each run REPEAT times (the result carries the mean ns per run)."""
    with program.on_one_cpu() as cpu:
        return [program.run(p, repeat=max(1, repeat), cpu=cpu, dry=not repeat) for p in packets]


def remove_pins(pin_dir) -> None:
    """Unpin every map and program under PIN_DIR (`ztgate gateway teardown`)."""
    unpin_all(pin_dir)
    forget_record(pin_dir)
