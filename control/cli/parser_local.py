"""The verbs that need no running gateway: the reference and the kernel on files (explain,
dataplane verdicts), the engine alone on an interface (dataplane attach/detach), and a
device's login through the gateway's identity provider."""
from __future__ import annotations

from .verbs import files, verb


def _offline(name: str):
    """offline.py's cmd NAME, imported when it runs: the verbs that talk to a gateway start
    without the policy files' readers, the reference and the packet parsers (CLI start-up
    counts in a revocation's time)."""
    def run(args) -> int:
        from . import offline
        return getattr(offline, name)(args)
    return run


cmd_explain, cmd_verdicts, cmd_check = _offline("cmd_explain"), _offline("cmd_verdicts"), _offline("cmd_check")


def offline(nouns) -> None:
    """explain, dataplane verdicts/attach/detach: files only, no gateway."""
    ex = verb(nouns, "explain", "the reference verdicts; or why one packet gets its verdict",
        "Decide packets with the reference evaluator (the spec in code). With --packets, one "
                    "JSON verdict a line; with one packet given by flags, the verdict, the rule, and why "
                    "each rule tried before it did not match.",
        """
            ztgate explain --policy p.yaml --identities i.yaml --packets pkts.jsonl
            ztgate explain --policy p.yaml --identities i.yaml --user bob@example.com --dst 10.20.0.10 --proto tcp --dport 22
            ztgate explain --policy p.yaml --identities i.yaml --src 100.96.0.2 --dst 10.20.0.10 --proto icmp --json
        """)
    files(ex, packets=True)
    who = ex.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="EMAIL", help="the packet comes from this user's first enabled device")
    who.add_argument("--src", metavar="ADDR", help="source address (a device's tunnel address)")
    ex.add_argument("--dst", metavar="ADDR", help="destination address")
    ex.add_argument("--proto", default="tcp", help="tcp, udp, icmp or a protocol number (default tcp)")
    ex.add_argument("--sport", type=int, metavar="PORT", help="source port (tcp/udp; default 0)")
    ex.add_argument("--dport", type=int, metavar="PORT", help="destination port (tcp/udp; default 0)")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.add_argument("--dns", metavar="LEARNED.jsonl",
                    help='addresses learned for names: one {"name", "address"} a line, valid for the whole run')
    ex.set_defaults(run=cmd_explain)

    dp = nouns.add_parser("dataplane", help="the kernel data plane").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    ve = verb(dp, "verdicts", "kernel verdicts through BPF_PROG_TEST_RUN",
        "Compile the files into the gateway's maps, load the gateway's XDP program (attached to "
                    "nothing), run each packet through it with BPF_PROG_TEST_RUN and print the kernel's "
                    "verdict and rule, one JSON object a line. Needs root.",
        """
            ztgate dataplane verdicts --policy p.yaml --identities i.yaml --packets pkts.jsonl
            ztgate dataplane verdicts --policy p.yaml --identities i.yaml --packets pkts.jsonl --repeat 100000
        """)
    files(ve, packets=False)
    ve.add_argument("--packets", required=True, metavar="FILE", help="packets, one JSON object a line")
    ve.add_argument("--repeat", type=int, default=0, metavar="N",
                    help="run each packet N times and add the kernel's mean ns per run")
    ve.add_argument("--ethernet", action="store_true",
                    help="build the Ethernet-device program (frames get an Ethernet header)")
    ve.add_argument("--dns", metavar="LEARNED.jsonl",
                    help='addresses learned for names: one {"name", "address"} a line, valid for the whole run')
    ve.set_defaults(run=cmd_verdicts)
    _dataplane_attach(dp)


def _dataplane_attach(dp) -> None:
    """dataplane attach, detach: the engine alone on an interface (control/cli/dataplane_attach.py)."""
    from .dataplane_attach import MODES, cmd_dataplane_attach, cmd_dataplane_detach

    at = verb(dp, "attach", "the engine alone on an interface: an identity-aware firewall, no daemon",
        "Compile the files (checked as `policy apply` checks them), build the gateway's XDP program "
                    "for the interface's frames (Ethernet or from the IP header, by its link type), fill "
                    "it, attach it and pin it under /sys/fs/bpf/ztgate-dp. Attaching again replaces the "
                    "policy in one step: one netlink call swaps the whole new build in, and flows are "
                    "decided again by the new policy. Refuses an interface that carries another XDP "
                    "program (a gateway's above all). Events are not read: no `ztgate logs` here. Needs root.",
        """
            ztgate dataplane attach eth1 --policy p.yaml --identities i.yaml
            ztgate dataplane attach veth0 --policy p.yaml --identities i.yaml --mode generic
            ztgate dataplane detach eth1
        """)
    at.add_argument("iface", metavar="IFACE", help="the interface whose incoming packets are decided")
    files(at, packets=False)
    at.add_argument("--mode", choices=MODES, default="auto",
                    help="XDP mode: native (driver), generic (SKB); default auto: the mode in force, else "
                         "native where the driver has it, else generic")
    at.add_argument("--json", action="store_true", help="machine-readable output")
    at.set_defaults(run=cmd_dataplane_attach)
    de = verb(dp, "detach", "remove the engine `dataplane attach` put on an interface",
              "Detach the engine's XDP program from IFACE and remove its pins (only the pins when the "
              "interface is gone). Refuses another program. Needs root.", "ztgate dataplane detach eth1")
    de.add_argument("iface", metavar="IFACE")
    de.add_argument("--json", action="store_true", help="machine-readable output")
    de.set_defaults(run=cmd_dataplane_detach)


def login(nouns) -> None:
    """login: the device's side of enrollment through the identity provider (issue 14)."""
    from .login import cmd_login
    lo = verb(nouns, "login", "log this device in through the identity provider and enroll it",
        "On a device: make a WireGuard key pair here, get an ID token from the gateway's identity "
        "provider (the device authorization grant where it offers it: approve on any browser; "
        "otherwise a browser on this machine and a loopback redirect), enroll the public key, and "
        "write the wg-quick configuration with the private key (mode 0600). Run again with the same "
        "configuration, it renews the session with the same key.",
        """
            ztgate login --gateway https://gw.example.com:8443 --name alice-laptop --up
            ztgate login --gateway https://198.18.0.1:8443 --ca /run/ztgate-lab/ca.pem --config ./lab.conf
        """)
    lo.add_argument("--gateway", required=True, metavar="URL", help="the enrollment service, https://HOST:PORT")
    lo.add_argument("--name", metavar="NAME", help="this device's name (default: the host name)")
    lo.add_argument("--ca", metavar="FILE", help="CA certificates to trust besides the system's (PEM)")
    lo.add_argument("--config", default="/etc/wireguard/ztgate.conf", metavar="FILE",
                    help="the wg-quick configuration to write (default /etc/wireguard/ztgate.conf)")
    lo.add_argument("--flow", choices=("auto", "device", "code"), default="auto",
                    help="device: the device authorization grant; code: a browser here (default: device "
                         "where the provider offers it)")
    lo.add_argument("--up", action="store_true", help="bring the tunnel up with wg-quick")
    lo.add_argument("--json", action="store_true", help="machine-readable output")
    lo.set_defaults(run=cmd_login)
