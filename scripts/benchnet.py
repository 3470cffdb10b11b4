"""The forwarding path of the real-traffic bench (scripts/benchtraffic.py): three network
namespaces, trafgen in the first, the case under test on the middle one's ingress veth, an
XDP counter on the last; and the switches between cases. Everything it makes goes at exit.

    gen  198.19.0.1 --veth-- 198.19.0.254 [IN] fwd [OUT] 198.19.1.254 --veth-- 198.19.1.1 sink
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from pyroute2 import IPRoute, netns
from scapy.layers.inet import IP, TCP as TCPHeader, UDP as UDPHeader
from scapy.layers.l2 import Ether

import benchnft
from control.cli.dataplane_attach import attach_policy
from control.model import TCP
from dataplane import standalone
from dataplane.attach import attach, detach
from dataplane.libbpf import obj_get

PASS_ALL = "int xdp_pass_all(struct xdp_md *ctx) { return XDP_PASS; }"
COUNT_DROP = """
BPF_PERCPU_ARRAY(delivered, u64, 1);
int xdp_count(struct xdp_md *ctx) {
    int zero = 0;
    u64 *n = delivered.lookup(&zero);
    if (n)
        *n += 1;
    return XDP_DROP;
}
"""
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
FRAME = 64      # bytes on the wire (without FCS): the smallest Ethernet frame


class Path3:
    def __init__(self, cpu: int = 1):
        self.cpu = cpu
        self.token = secrets.token_hex(3)
        self.ns = {n: f"ztbt-{self.token}-{n}" for n in ("gen", "fwd", "sink")}
        self.dir = Path(tempfile.mkdtemp(prefix="ztbt-"))
        self.bpf = []
        self.ztgate_fd = None
        self.table = None

    # ----------------------------------------------------------------------------- set-up
    def __enter__(self) -> "Path3":
        from bcc import BPF

        try:
            for real in self.ns.values():
                netns.create(real)
                # no IPv6 chatter (router solicitations, MLD) among the counted packets
                self.sh(real, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
                self.sh(real, "ip link set lo up")
            self._veth("gen", "g0", "fwd", "in0", "198.19.0.1/24", "198.19.0.254/24")
            self._veth("fwd", "out0", "sink", "s0", "198.19.1.254/24", "198.19.1.1/24")
            fwd = self.ns["fwd"]
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.in0.rp_filter=0",
                        "net.ipv4.conf.default.rp_filter=0"):
                self.sh(fwd, f"sysctl -qw {key}")
            for prefix in ("10.0.0.0/8", "172.16.0.0/12"):
                self.sh(fwd, f"ip route add {prefix} via 198.19.1.1")
            self.sh(fwd, f"ip neigh replace 198.19.1.1 lladdr {self.mac('sink', 's0')} dev out0 nud permanent")
            counter = BPF(text=COUNT_DROP)
            self.bpf.append(counter)
            self.delivered = counter["delivered"]
            self._xdp("sink", "s0", counter.load_func("xdp_count", BPF.XDP).fd, "native")
            passer = BPF(text=PASS_ALL)
            self.bpf.append(passer)
            self.pass_fd = passer.load_func("xdp_pass_all", BPF.XDP).fd
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for real in self.ns.values():
            subprocess.run(["ip", "netns", "del", real], capture_output=True)
        for b in self.bpf:
            b.cleanup()
        subprocess.run(["rm", "-rf", str(self.dir)])

    def sh(self, real: str, cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/run/netns/{real}", *cmd.split()], check=True,
                              capture_output=True, text=True, **kw)

    def _veth(self, a: str, name_a: str, b: str, name_b: str, addr_a: str, addr_b: str) -> None:
        self.sh(self.ns[a], f"ip link add {name_a} type veth peer name {name_b} netns {self.ns[b]}")
        for ns, name, addr in ((a, name_a, addr_a), (b, name_b, addr_b)):
            self.sh(self.ns[ns], f"ip addr add {addr} dev {name}")
            self.sh(self.ns[ns], f"ip link set {name} up")

    def mac(self, ns: str, name: str) -> str:
        netns.pushns(f"/run/netns/{self.ns[ns]}")
        try:
            with IPRoute() as ipr:
                return ipr.get_links(ifname=name)[0].get_attr("IFLA_ADDRESS")
        finally:
            netns.popns()

    def _xdp(self, ns: str, ifname: str, fd, mode: str) -> None:
        """FD's program on IFNAME in place of what is there (one netlink call); None: none."""
        netns.pushns(f"/run/netns/{self.ns[ns]}")
        try:
            if fd is None:
                detach(ifname)
            else:
                attach(SimpleNamespace(fn=SimpleNamespace(fd=fd)), ifname, mode)
        finally:
            netns.popns()

    # ------------------------------------------------------------------------------ cases
    def write_flows(self, flows) -> None:
        """The trafgen configuration: one 64-byte frame per flow, sent round-robin."""
        src, dst = self.mac("gen", "g0"), self.mac("fwd", "in0")
        blocks = []
        for f in flows:
            l4 = TCPHeader(sport=f.sport, dport=f.dport, flags="S") if f.proto == TCP else \
                UDPHeader(sport=f.sport, dport=f.dport)
            frame = bytes(Ether(src=src, dst=dst) / IP(src=str(f.src), dst=str(f.dst), ttl=64) / l4)
            frame = frame.ljust(FRAME, b"\0")
            blocks.append("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }")
        (self.dir / "flows.cfg").write_text("\n".join(blocks) + "\n")
        self.flow_count = len(flows)

    def attach_ztgate(self, policy, identities, mode: str) -> dict:
        """The engine on fwd's ingress through `dataplane attach`'s code; kept by its pin for use()."""
        netns.pushns(f"/run/netns/{self.ns['fwd']}")
        try:
            done = attach_policy("in0", policy, identities, mode)
            self.ztgate_fd = obj_get(Path(done["pins"]) / "prog")
        finally:
            netns.popns()
        return done

    def remove_ztgate(self) -> None:
        netns.pushns(f"/run/netns/{self.ns['fwd']}")
        try:
            standalone.remove("in0")
        finally:
            netns.popns()

    def load_nftables(self, policy, identities, timeout: float) -> bool:
        """The policy as nftables in fwd's forward hook, dormant until use("nftables"). False
        when nft did not load it within TIMEOUT seconds."""
        path = self.dir / "ruleset.nft"
        path.write_text(benchnft.ruleset(policy, identities, dormant=True))
        try:
            self.sh(self.ns["fwd"], f"nft -f {path}", timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.table = "ztbench"
        return True

    def remove_nftables(self) -> None:
        if self.table:
            self.sh(self.ns["fwd"], f"nft delete table inet {self.table}")
            self.table = None

    def use(self, case: str, mode: str) -> None:
        """Make CASE the path: the XDP program on fwd's ingress, and the nft table awake or not."""
        self._xdp("fwd", "in0", self.program_fd(case), mode)
        if self.table:
            flags = "" if case == "nftables" else "flags dormant;"
            self.sh(self.ns["fwd"], f"nft add table inet {self.table} {{ {flags} }}")

    # --------------------------------------------------------------------------- counting
    def program_fd(self, case: str):
        return {"pass-all": self.pass_fd, "ztgate": self.ztgate_fd}.get(case)

    def count(self) -> int:
        return int(self.delivered.sum(0).value)

    def trafgen(self, *extra: str) -> subprocess.Popen:
        cmd = ["nsenter", f"--net=/run/netns/{self.ns['gen']}", "taskset", "-c", str(self.cpu), "trafgen",
               "--dev", "g0", "--conf", str(self.dir / "flows.cfg"), "--cpus", "1", "--no-sock-mem", *extra]
        # a session of its own: trafgen forks its sender, and both must stop (stop_trafgen)
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    @staticmethod
    def stop_trafgen(p: subprocess.Popen) -> None:
        """An interrupt to trafgen and its sender (how it is stopped), then a kill if need be."""
        for sig in (signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(3)
                deadline = time.monotonic() + 3
                while _group_alive(p.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _group_alive(p.pid):
                    return
            except subprocess.TimeoutExpired:
                pass

    def one_pass(self) -> int:
        """Every flow once, gently: how many arrived."""
        before = self.count()
        p = self.trafgen("--num", str(self.flow_count), "--gap", "50us")
        try:
            _, err = p.communicate(timeout=30)
        finally:
            self.stop_trafgen(p)
        if p.returncode != 0:
            raise SystemExit(f"benchtraffic: trafgen failed: {err}")
        time.sleep(0.2)
        return self.count() - before

    def rate(self, seconds: float, fd=None, warmup: float = 0.5) -> tuple[float, float]:
        """Packets a second delivered while trafgen sends as fast as it can; and the mean ns a run
        of the program FD took meanwhile (kernel.bpf_stats_enabled; nan without it or FD)."""
        p = self.trafgen()
        was = BPF_STATS.read_text()
        try:
            if fd is not None:
                BPF_STATS.write_text("1")    # only while measured: every program on the host pays for it
            time.sleep(warmup)
            if p.poll() is not None:
                raise SystemExit(f"benchtraffic: trafgen stopped: {p.stderr.read()}")
            s0 = run_stats(fd)
            n0, t0 = self.count(), time.perf_counter()
            time.sleep(seconds)
            n1, t1 = self.count(), time.perf_counter()
            s1 = run_stats(fd)
        finally:
            BPF_STATS.write_text(was)
            self.stop_trafgen(p)
        runs = s1[1] - s0[1]
        return (n1 - n0) / (t1 - t0), (s1[0] - s0[0]) / runs if runs else float("nan")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_stats(fd) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program FD: struct bpf_prog_info's, at offsets 192 and 200
    (linux/bpf.h), counted only while kernel.bpf_stats_enabled is 1."""
    if fd is None:
        return 0, 0
    from dataplane.libbpf import check, libbpf

    buf = ctypes.create_string_buffer(256)
    size = ctypes.c_uint32(256)
    check(libbpf().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(size)), "program info")
    return struct.unpack_from("<QQ", buf, 192)
