"""Network namespaces for root tests: create them, wire them, run things inside, and always
remove everything afterwards.

    with Namespaces("ztwg") as ns:
        ns.add("gw"); ns.add("cl")
        ns.veth("gw", "cl", "198.18.0.1/24", "198.18.0.2/24")
        ns.run("cl", "ip", "route")                      # a command inside "cl"
        with ns.inside("gw"):                            # this thread inside "gw"
            wireguard.ensure_interface(ns.ifname("wg"), ...)

Names are unique per instance (prefix + random token), so parallel runs and leftovers of
killed runs never collide. Interface names handed out by ifname() are unique across
namespaces too, which wireguard-go needs: its sockets /var/run/wireguard/NAME.sock share
one folder for all namespaces.

Cleanup (close(), or leaving the with block, also after a failed test) kills every process
still running inside our namespaces (wireguard-go daemons are in sessions of their own and
would otherwise keep the namespace alive), removes the sockets of the interface names we
handed out, and removes the namespaces, which takes their veths with them. Test traffic
stays inside these namespaces: nothing is added to the host's own namespace.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket as _socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, netns

NETNS_DIR = "/run/netns"
WG_SOCKET_DIR = "/var/run/wireguard"
REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05, what: str = "condition"):
    """Poll PREDICATE until it returns something true; return that, or fail after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Namespaces:
    def __init__(self, prefix: str = "zt"):
        self.prefix = prefix
        self.token = secrets.token_hex(3)[:5]    # 5 hex characters, fresh for every instance
        self.names: dict[str, str] = {}          # our short name -> the namespace's real name
        self.ifnames: list[str] = []             # interface names handed out by ifname()
        self.procs: list[subprocess.Popen] = []
        self.sockets: list[_socket.socket] = []
        self._count = 0

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "Namespaces":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------------------- names
    def __getitem__(self, name: str) -> str:
        return self.names[name]

    def path(self, name: str) -> str:
        return f"{NETNS_DIR}/{self.names[name]}"

    def _next(self) -> int:
        self._count += 1
        return self._count

    def ifname(self, base: str = "wg") -> str:
        """A fresh interface name, unique on the host (≤ 15 characters), whose wireguard-go
        socket cleanup removes. BASE: up to 7 characters."""
        if not 1 <= len(base) <= 7:
            raise ValueError(f"interface name base {base!r}: 1 to 7 characters")
        name = f"{base}{self.token}{self._next()}"
        assert len(name) <= 15, name
        self.ifnames.append(name)
        return name

    # ---------------------------------------------------------------------- namespaces
    def add(self, name: str) -> str:
        """Create the namespace known here as NAME (loopback up); return its real name."""
        if name in self.names:
            raise ValueError(f"namespace {name} exists already")
        real = f"{self.prefix}-{self.token}-{name}"
        netns.create(real)
        self.names[name] = real
        with self.inside(name), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return real

    def veth(self, ns_a: str, ns_b: str, addr_a: str, addr_b: str) -> tuple[str, str]:
        """A veth pair from ns_a to ns_b with these addresses ("198.18.0.1/24"), both up.
        Returns the two interface names."""
        n = self._next()
        name_a, name_b = f"v{n}{ns_b}"[:15], f"v{n}{ns_a}"[:15]
        with self.inside(ns_a), IPRoute() as ipr:     # created inside ns_a: no name in the host
            ipr.link("add", ifname=name_a, kind="veth", peer=name_b)
            ipr.link("set", index=ipr.link_lookup(ifname=name_b)[0], net_ns_fd=self.path(ns_b))
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            address, prefixlen = addr.split("/")
            with self.inside(ns), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.addr("add", index=idx, address=address, prefixlen=int(prefixlen))
                ipr.link("set", index=idx, state="up")
        return name_a, name_b

    # ---------------------------------------------------------------- running inside
    # Commands run under `nsenter --net=/run/netns/NAME`, NOT `ip netns exec NAME`: the latter
    # also unshares the mount namespace and remounts /sys for the namespace, which hides
    # /sys/fs/bpf (pinned maps and programs) and any other mount under /sys. nsenter --net
    # changes the network namespace only (and execs the command: no extra process between).
    def command(self, ns: str, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.path(ns)}", *map(str, cmd)]

    def run(self, ns: str, *cmd, check: bool = True, timeout: float = 10,
            input: str | None = None, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run CMD inside NS, wait, capture its output (text). With check, a failure raises
        an error that shows the output."""
        r = subprocess.run(self.command(ns, *cmd), capture_output=True, text=True, timeout=timeout,
                           input=input, env=env, cwd=cwd)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} in {ns} failed (exit {r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
        return r

    def popen(self, ns: str, *cmd, **kwargs) -> subprocess.Popen:
        """Start CMD inside NS; cleanup ends it if it still runs."""
        p = subprocess.Popen(self.command(ns, *cmd), **kwargs)
        self.procs.append(p)
        return p

    def python(self, ns: str, code: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Python snippet with the project's venv, inside NS, from the repository root
        (so `import control` works): a process of its own, for what must not share ours."""
        return self.run(ns, PYTHON, "-c", code, timeout=timeout, check=check, cwd=REPO)

    @contextmanager
    def inside(self, ns: str):
        """Run the body with THIS THREAD in namespace NS, and come back afterwards (also on
        an exception). setns(2) for a network namespace changes only the calling thread, and
        pyroute2 and the control code open their netlink sockets at each call, so library
        code called in the body acts in NS, as a controller started in NS would. Sockets
        opened in the body stay in NS for their whole life; processes started in the body
        start in NS. Chosen over a forked child (fork in a process that may have threads is
        not safe, and results would have to be pickled back) and over a subprocess per call
        (about 0.2 s of imports each; see python() for that when isolation matters)."""
        netns.pushns(self.path(ns))
        try:
            yield
        finally:
            netns.popns()

    def socket(self, ns: str, kind: int = _socket.SOCK_DGRAM, family: int = _socket.AF_INET,
               timeout: float = 2.0) -> _socket.socket:
        """A socket living in NS (closed at cleanup)."""
        with self.inside(ns):
            s = _socket.socket(family, kind)
        s.settimeout(timeout)
        self.sockets.append(s)
        return s

    # -------------------------------------------------------------------------- cleanup
    def _pids_inside(self) -> list[int]:
        """Processes whose network namespace is one of ours (never this process)."""
        ours = set()
        for real in self.names.values():
            try:
                st = os.stat(f"{NETNS_DIR}/{real}")
                ours.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ours:
                pids.append(int(entry))
        return pids

    def close(self) -> None:
        """Remove everything this instance created; try every step, then report failures."""
        failures = []
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(2)
        self.procs.clear()
        # Whatever still runs inside (wireguard-go daemons, left-over servers): TERM, then KILL.
        for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
            pids = self._pids_inside()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.02)
                pids = [pid for pid in self._pids_inside() if not _zombie(pid)]
            if not pids:
                break
        else:
            failures.append(f"processes still inside our namespaces: {pids}")
        for name in self.ifnames:
            try:
                os.unlink(f"{WG_SOCKET_DIR}/{name}.sock")
            except FileNotFoundError:
                pass
            except OSError as e:
                failures.append(f"cannot remove {WG_SOCKET_DIR}/{name}.sock: {e}")
        for real in self.names.values():
            try:
                netns.remove(real)        # its veths go with it (and their peers elsewhere)
            except OSError as e:
                failures.append(f"cannot remove namespace {real}: {e}")
        self.names.clear()
        if failures:
            raise RuntimeError("namespace cleanup: " + "; ".join(failures))


def _zombie(pid: int) -> bool:
    """An exited process not yet reaped: it no longer holds its namespace."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
