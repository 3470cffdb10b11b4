"""The `ztgate` argument parser: one function per noun, each adding its verbs (spec/CLI.md).
Every verb's flags, help and examples are here; what a verb does is its cmd_* function."""
from __future__ import annotations

import argparse

from dataplane.reasons import Verdict

from .changes import (cmd_connector_add, cmd_connector_list, cmd_connector_remove, cmd_connector_run,
                      cmd_device_add, cmd_device_disable, cmd_device_enable, cmd_device_list, cmd_device_remove,
                      cmd_gateway_run, cmd_gateway_teardown, cmd_group_add, cmd_group_add_member, cmd_group_list,
                      cmd_group_remove, cmd_group_remove_member, cmd_identities_show, cmd_lab, cmd_policy_apply,
                      cmd_policy_show, cmd_route_add, cmd_route_list, cmd_route_remove, cmd_rule_add,
                      cmd_rule_disable, cmd_rule_enable, cmd_rule_list, cmd_rule_move, cmd_rule_remove,
                      cmd_user_add, cmd_user_list, cmd_user_remove)
from .changes import cmd_lab_token
from .parser_local import cmd_check, login, offline
from .sessions import cmd_device_expire, cmd_user_expire
from .verbs import epilog, files, gw, verb
from .watch import cmd_audit, cmd_flows, cmd_flows_kill, cmd_logs, cmd_status, cmd_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ztgate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Identity-aware Layer-4 firewall for WireGuard gateways, decided in the kernel by eBPF.",
        epilog=epilog("""
            ztgate explain --policy policy.yaml --identities identities.yaml --user bob@example.com \\
                --dst 10.20.0.10 --proto tcp --dport 22
            ztgate dataplane verdicts --policy policy.yaml --identities identities.yaml --packets pkts.jsonl
            ztgate policy check --policy policy.yaml --identities identities.yaml
        """))
    nouns = p.add_subparsers(dest="noun", metavar="COMMAND", required=True)
    for add in (offline, _policy, _rules, _users_groups, _devices, _flows, _connectors_routes, _lab_logs_trace,
                _status_audit_gateway):
        add(nouns)
    login(nouns)      # issue 14: the device's side
    _dns(nouns)
    return p


def _dns(nouns) -> None:
    """dns list: the names the DNS slow path learned (control/dns)."""
    from .dns import cmd_dns_list
    dn = nouns.add_parser("dns", help="names learned from the private resolvers' answers").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    dl = verb(dn, "list", "learned names: addresses, expiry, who asked",
        "The names the gateway learned from its resolvers' answers to devices (`dns: resolvers:` in the "
        "gateway config), each address with its expiry and the device whose question it answered, and "
        "the slow path's counters (answers queued, learned, refused by why, released late).",
        """
            ztgate dns list
            ztgate dns list --name app.lab.example --json
        """)
    dl.add_argument("--name", metavar="NAME", help="only this name")
    gw(dl, reads=True, run=cmd_dns_list)


def _policy(nouns) -> None:
    """policy check, apply, show; identities show."""
    po = nouns.add_parser("policy", help="policy files").add_subparsers(dest="verb", metavar="VERB", required=True)
    ch = verb(po, "check", "validate the files and show what they compile to",
        "Validate both files as the gateway would, compile them, and print the sizes of the "
                    "kernel tables. Changes nothing; needs no root.",
        "ztgate policy check --policy p.yaml --identities i.yaml --json")
    files(ch, packets=False)
    ch.add_argument("--json", action="store_true", help="machine-readable output")
    ch.set_defaults(run=cmd_check)

    ap = verb(po, "apply", "replace the running gateway's rules (and identities) atomically",
        "Validate the files as `policy check` does and make them the gateway's policy in one "
        "transaction: the store and the kernel move to a new generation together, or neither "
        "moves. Prints the difference; with --dry-run only prints it.",
        """
            ztgate policy apply policy.yaml --dry-run
            ztgate policy apply policy.yaml --identities identities.yaml
        """)
    ap.add_argument("file", metavar="FILE", help="policy.yaml")
    ap.add_argument("--identities", metavar="FILE", help="also replace users and devices with this file")
    ap.add_argument("--dry-run", action="store_true", help="show the difference, change nothing")
    gw(ap, reads=True, run=cmd_policy_apply)
    sh = verb(po, "show", "the policy in force, in the file format",
        "Print the running gateway's policy as policy.yaml (it round-trips through `policy apply`).",
        "ztgate policy show > policy.yaml")
    gw(sh, reads=True, run=cmd_policy_show)

    ids = nouns.add_parser("identities", help="users and devices as a file").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gw(verb(ids, "show", "users and devices in force, in the identities file format",
            "Print the running gateway's users and devices as identities.yaml.",
            "ztgate identities show > identities.yaml"), reads=True, run=cmd_identities_show)


def _rules(nouns) -> None:
    """rule list, add, remove, enable, disable, move."""
    ru = nouns.add_parser("rule", help="rules of the running gateway").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gw(verb(ru, "list", "rules in precedence order, with hit counts",
            "The rules the gateway holds, in the order they are tried, with the packets and bytes "
            "each has decided since the controller started.", "ztgate rule list\nztgate rule list --json"),
       reads=True, run=cmd_rule_list)
    ra = verb(ru, "add", "add a rule (the fields of a policy-file rule)",
        "Add one rule; its fields and checks are those of a rule in policy.yaml. Without "
        "--precedence it goes after the last rule.",
        """
            ztgate rule add ssh-admins --action allow --principal group:admins --proto tcp \\
                --dst-cidr 10.20.0.0/24 --dst-port 22
            ztgate rule add no-rdp --action block --proto tcp --dst-port 3389 --precedence 5
            ztgate rule add web --action allow --principal user:bob@example.com --dst-cidr 10.20.0.10/32 \\
                --dst-port 80,443 --proto tcp
        """)
    ra.add_argument("name", metavar="NAME")
    ra.add_argument("--action", required=True, choices=("allow", "block"))
    ra.add_argument("--precedence", type=int, help="lower is tried first (default: after the last rule)")
    ra.add_argument("--principal", action="append", metavar="KIND:NAME",
                    help="user:EMAIL, group:NAME or device:NAME (repeat; none: everyone)")
    ra.add_argument("--proto", action="append", metavar="P", help="tcp, udp, icmp (repeat or comma-separate)")
    ra.add_argument("--src-cidr", action="append", metavar="PREFIX", help="source prefix (repeat)")
    ra.add_argument("--src-port", action="append", metavar="PORTS", help="source port or range a-b (repeat)")
    ra.add_argument("--dst-cidr", action="append", metavar="PREFIX", help="destination prefix (repeat)")
    ra.add_argument("--dst-except", action="append", metavar="PREFIX", help="destination prefix excluded (repeat)")
    ra.add_argument("--dst-port", action="append", metavar="PORTS", help="destination port or range a-b (repeat)")
    ra.add_argument("--disabled", action="store_true", help="add it disabled")
    gw(ra, reads=True, run=cmd_rule_add)
    for name, help_, run in (("remove", "remove a rule", cmd_rule_remove),
                             ("enable", "enable a rule", cmd_rule_enable),
                             ("disable", "disable a rule (kept, not tried)", cmd_rule_disable)):
        sp = verb(ru, name, help_, help_[0].upper() + help_[1:] + " of the running gateway; the kernel "
                  "follows in the same transaction.", f"ztgate rule {name} ssh-admins")
        sp.add_argument("name", metavar="NAME")
        gw(sp, reads=False, run=run)
    mv = verb(ru, "move", "change where a rule is tried",
        "Give the rule a new precedence, or put it just before or after another rule (rules are "
        "renumbered by tens when there is no room between the two).",
        "ztgate rule move no-rdp --before ssh-admins\nztgate rule move web --precedence 300")
    mv.add_argument("name", metavar="NAME")
    where = mv.add_mutually_exclusive_group(required=True)
    where.add_argument("--precedence", type=int)
    where.add_argument("--before", metavar="RULE")
    where.add_argument("--after", metavar="RULE")
    gw(mv, reads=False, run=cmd_rule_move)


def _users_groups(nouns) -> None:
    """user and group verbs."""
    us = nouns.add_parser("user", help="users").add_subparsers(dest="verb", metavar="VERB", required=True)
    gw(verb(us, "list", "users, their groups and device counts", "Users of the running gateway.",
            "ztgate user list --json"), reads=True, run=cmd_user_list)
    ua = verb(us, "add", "add a user", "Add a user, optionally in groups.",
              "ztgate user add carol@example.com --group developers --group staff")
    ua.add_argument("email", metavar="EMAIL")
    ua.add_argument("--group", action="append", default=[], metavar="GROUP", help="a group (repeat)")
    gw(ua, reads=False, run=cmd_user_add)
    ur = verb(us, "remove", "remove a user", "Remove a user; refused while the user has devices unless "
              "--with-devices (their access ends at once).", "ztgate user remove carol@example.com --with-devices")
    ur.add_argument("email", metavar="EMAIL")
    ur.add_argument("--with-devices", action="store_true", help="also remove the user's devices")
    gw(ur, reads=False, run=cmd_user_remove)
    ue = verb(us, "expire", "end every IdP session of a user's devices now",
              "End the sessions of every device the user enrolled through the identity provider: their "
              "packets drop as session-expired and their open flows end at once, both ways; the user "
              "must log in again. Devices enrolled by hand have no session and stay.",
              "ztgate user expire alice@example.com")
    ue.add_argument("email", metavar="EMAIL")
    gw(ue, reads=False, run=cmd_user_expire)

    gr = nouns.add_parser("group", help="groups and membership").add_subparsers(dest="verb", metavar="VERB", required=True)
    gw(verb(gr, "list", "groups and their members",
            "Groups of the gateway (and the local groups of the policy file, marked 'policy').",
            "ztgate group list"), reads=True, run=cmd_group_list)
    for name, help_, run in (("add", "add an empty group", cmd_group_add),
                             ("remove", "remove a group (its members leave it)", cmd_group_remove)):
        sp = verb(gr, name, help_, help_[0].upper() + help_[1:] + ".", f"ztgate group {name} admins")
        sp.add_argument("name", metavar="GROUP")
        gw(sp, reads=False, run=run)
    for name, help_, run in (("add-member", "put a user in a group", cmd_group_add_member),
                             ("remove-member", "take a user out of a group", cmd_group_remove_member)):
        sp = verb(gr, name, help_, help_[0].upper() + help_[1:] + "; the user's devices follow at once.",
                  f"ztgate group {name} admins bob@example.com")
        sp.add_argument("group", metavar="GROUP")
        sp.add_argument("email", metavar="EMAIL")
        gw(sp, reads=False, run=run)


def _devices(nouns) -> None:
    """device list, add, disable, enable, remove."""
    de = nouns.add_parser("device", help="devices and their WireGuard peers").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gw(verb(de, "list", "devices with last handshake and traffic",
            "Devices, their tunnel addresses, and what WireGuard says of them.", "ztgate device list"),
       reads=True, run=cmd_device_list)
    da = verb(de, "add", "enroll a device and print its WireGuard configuration",
        "Enroll a device: a key pair (made here unless --public-key is given), a free tunnel "
        "address, a WireGuard peer admitting only that address. Prints a client configuration "
        "for wg-quick or a WireGuard app; it holds the private key, which the gateway does not keep.",
        """
            ztgate device add alice-laptop --user alice@example.com > alice-laptop.conf
            ztgate device add bob-phone --user bob@example.com --public-key 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='
        """)
    da.add_argument("name", metavar="NAME")
    da.add_argument("--user", required=True, metavar="EMAIL")
    da.add_argument("--public-key", metavar="KEY", help="the device's own WireGuard public key (base64)")
    gw(da, reads=True, run=cmd_device_add)
    for name, help_, run in (("disable", "take a device's access away at once (kept, can be enabled)",
                              cmd_device_disable),
                             ("enable", "give a disabled device its access back", cmd_device_enable),
                             ("remove", "remove a device: its access ends at once", cmd_device_remove)):
        sp = verb(de, name, help_, help_[0].upper() + help_[1:] + "; its peer and its kernel entry change "
                  "in one transaction, open flows included.", f"ztgate device {name} bob-laptop")
        sp.add_argument("name", metavar="NAME")
        gw(sp, reads=False, run=run)
    dx = verb(de, "expire", "end a device's IdP session now",
              "End the session of a device enrolled through the identity provider: its packets drop as "
              "session-expired and its open flows end at once, both ways. Its WireGuard peer stays: "
              "a new login (renewal) gives access back at once.", "ztgate device expire alice-laptop")
    dx.add_argument("name", metavar="NAME")
    gw(dx, reads=False, run=cmd_device_expire)


def _flows(nouns) -> None:
    """flows, and flows kill."""
    fl = verb(nouns, "flows", "tracked flows: who, what, rule, age, traffic; `flows kill` ends one",
        "The flows conntrack holds (newest first): each allowed flow's user, device, 5-tuple, the rule "
        "that allowed it, state, age, idle time, and packets and bytes both ways. An ICMP echo shows "
        "its id as the source port.",
        """
            ztgate flows
            ztgate flows --user bob@example.com --json
            ztgate flows kill tcp 100.96.0.3:40522 10.20.0.10:22
        """)
    fl.add_argument("--user", metavar="EMAIL")
    fl.add_argument("--device", metavar="NAME")
    fl.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    gw(fl, reads=True, run=cmd_flows)
    fk_parent = fl.add_subparsers(dest="verb", metavar="VERB")
    fk = verb(fk_parent, "kill", "end a flow, or every flow of a user or device, at once, both ways",
        "End a tracked flow: its packets are dropped both ways (reason `killed`) for its protocol's "
        "conntrack timeout from the kill (`conntrack:` in the gateway config; by default TCP 3600 s, "
        "UDP 120 s, ICMP 30 s), however full the flow table gets, unless its device opens a new "
        "connection on the same ports first (a SYN, decided by the policy). Give it as `ztgate flows` "
        "prints it, or give --user or --device to end all of theirs (they stay enrolled; to keep them "
        "out, `device disable`). The gateway holds up to 65536 kills at once: a kill that does not fit "
        "is refused, and nothing of it is done.",
        "ztgate flows kill tcp 100.96.0.3:40522 10.20.0.10:22\nztgate flows kill udp [fd00:5a::3]:5000 [fd20::10]:53\n"
        "ztgate flows kill --device bob-laptop")
    fk.add_argument("proto", nargs="?", choices=("tcp", "udp", "icmp"))
    fk.add_argument("source", nargs="?", metavar="SRC:PORT")
    fk.add_argument("destination", nargs="?", metavar="DST:PORT")
    fk.add_argument("--user", dest="kill_user", metavar="EMAIL", help="every flow of this user's devices")
    fk.add_argument("--device", dest="kill_device", metavar="NAME", help="every flow of this device")
    gw(fk, reads=True, run=cmd_flows_kill)


def _connectors_routes(nouns) -> None:
    """connector and route verbs."""
    co = nouns.add_parser("connector", help="connectors: the way into private networks").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gw(verb(co, "list", "connectors, their routes and tunnel state",
            "Connectors of the running gateway: interface, port, routes, last handshake, traffic.",
            "ztgate connector list"), reads=True, run=cmd_connector_list)
    ca = verb(co, "add", "create a connector's tunnel on the gateway and print its configuration",
        "Create the gateway side of a connector: a WireGuard interface ztc-NAME listening on the next "
        "free port after the device port, with the connector-side eBPF program on it (only replies "
        "of flows devices opened go back to devices). Prints the configuration `ztgate connector run` "
        "reads inside the private network; it holds the connector's private key, which the gateway "
        "does not keep. Then route prefixes to it with `ztgate route add`.",
        """
            ztgate connector add lan > lan-connector.yaml
            ztgate connector add dc2 --port 51830 > dc2-connector.yaml
        """)
    ca.add_argument("name", metavar="NAME")
    ca.add_argument("--port", type=int, metavar="PORT", help="the port the gateway listens on for it")
    gw(ca, reads=True, run=cmd_connector_add)
    cr = verb(co, "remove", "remove a connector (after its routes)",
              "Delete the connector's interface on the gateway. Refused while routes point to it.",
              "ztgate connector remove dc2")
    cr.add_argument("name", metavar="NAME")
    gw(cr, reads=False, run=cmd_connector_remove)
    crun = verb(co, "run", "run a connector inside a private network (foreground)",
        "Bring up the connector's tunnel from the file `ztgate connector add` printed: it dials out "
        "to the gateway (no inbound port to open), routes the device pools into the tunnel and forwards "
        "between the tunnel and the LAN interfaces, and only between them (what comes in from the LAN "
        "may go to devices and nowhere else). Runs until stopped; stopping removes the tunnel.",
        """
            ztgate connector run lan-connector.yaml
            ztgate connector run lan-connector.yaml --lan eth1
        """)
    crun.add_argument("config", metavar="FILE")
    crun.add_argument("--lan", action="append", metavar="IFACE",
                      help="the interface to the private network (repeat; default: the one interface that "
                           "is not loopback, the tunnel or the uplink that reaches the gateway)")
    crun.set_defaults(run=cmd_connector_run)

    ro = nouns.add_parser("route", help="private prefixes routed to connectors").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gw(verb(ro, "list", "routes and whether the kernel holds them",
            "Private prefixes, their connectors, and whether ztgate's routing table holds them.",
            "ztgate route list"), reads=True, run=cmd_route_list)
    ra = verb(ro, "add", "route a private prefix to a connector",
        "Route PREFIX to the connector's tunnel, in ztgate's own routing table (used only by packets "
        "from devices). Prefixes may not overlap each other or the device pools. New devices get it "
        "in their configuration; enrolled devices need it in their AllowedIPs.",
        "ztgate route add 10.20.0.0/16 --connector lan")
    ra.add_argument("prefix", metavar="PREFIX")
    ra.add_argument("--connector", required=True, metavar="NAME")
    gw(ra, reads=False, run=cmd_route_add)
    rr = verb(ro, "remove", "stop routing a prefix", "Remove the route and the connector's claim to it.",
              "ztgate route remove 10.20.0.0/16")
    rr.add_argument("prefix", metavar="PREFIX")
    gw(rr, reads=False, run=cmd_route_remove)


def _lab_logs_trace(nouns) -> None:
    """lab up/status/down, logs, trace."""
    lab = nouns.add_parser("lab", help="the lab: a whole deployment in network namespaces (spec/LAB.md)"
                           ).add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, help_ in (("up", "build the lab (idempotent): namespaces, gateway, devices, connector, services"),
                        ("status", "what of the lab is there, and whether it works"),
                        ("down", "remove the lab and everything it made (idempotent)")):
        sp = verb(lab, name, help_, help_[0].upper() + help_[1:] + ".", f"ztgate lab {name}")
        if name == "status":
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(run=cmd_lab)
    tk = verb(lab, "token", "print a valid ID token of the lab's IdP for a lab user",
              "Print an ID token for EMAIL, minted and signed (current key) by the lab's identity "
              "provider in zt-idp (spec/IDENTITY.md), so that scripts and tests enroll without a browser. "
              "--groups sets this token's groups claim (default: the user's groups at the IdP).",
              """
                  ztgate lab token alice@example.com
                  ztgate lab token bob@example.com --groups staff,developers --ttl 120
              """)
    tk.add_argument("email", metavar="EMAIL")
    tk.add_argument("--groups", metavar="G,..", help="comma-separated groups for this token")
    tk.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: the IdP's, 600 s)")
    tk.set_defaults(run=cmd_lab_token)

    lg = verb(nouns, "logs", "flow events: who, what, verdict, rule, reason",
        "Flow events of the running gateway: every drop and every new allowed flow, with the "
        "user and device, addresses, ports, protocol, verdict, rule and reason.",
        """
            ztgate logs --verdict block
            ztgate logs --follow --user bob@example.com
            ztgate logs --since 5m --device bob-laptop
        """)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    lg.add_argument("--user", metavar="EMAIL")
    lg.add_argument("--device", metavar="NAME")
    lg.add_argument("--verdict", choices=[v.label for v in Verdict])
    lg.add_argument("--limit", type=int, default=50, help="how many past events (default 50)")
    lg.add_argument("--since", metavar="DURATION", help="only events of the last 30s, 5m, 2h...")
    gw(lg, reads=True, run=cmd_logs)

    tr = verb(nouns, "trace", "one packet through the running gateway's kernel program",
        "Run one packet through the program attached to the ingress interface (BPF_PROG_TEST_RUN) "
        "and through the reference; print the kernel's verdict and rule, and why each rule tried "
        "before it did not match.",
        """
            ztgate trace --user bob@example.com --dst 10.20.0.10 --proto tcp --dport 22
            ztgate trace --src 100.96.0.2 --dst 10.20.0.11 --proto tcp --dport 3389 --json
        """)
    who = tr.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="EMAIL", help="from this user's first enabled device")
    who.add_argument("--src", metavar="ADDR")
    tr.add_argument("--dst", required=True, metavar="ADDR")
    tr.add_argument("--proto", default="tcp")
    tr.add_argument("--sport", type=int, metavar="PORT")
    tr.add_argument("--dport", type=int, metavar="PORT")
    gw(tr, reads=True, run=cmd_trace)


def _status_audit_gateway(nouns) -> None:
    """status, audit, gateway run/teardown."""
    gw(verb(nouns, "status", "what is attached where, generation, counts, devices online",
            "The running gateway at a glance.", "ztgate status\nztgate status --json"), reads=True, run=cmd_status)
    au = verb(nouns, "audit", "the change history: what, when, by whom",
              "Accepted changes, oldest first, with generation and the local uid that made them.",
              "ztgate audit --limit 20")
    au.add_argument("--limit", type=int, default=50)
    gw(au, reads=True, run=cmd_audit)

    ga = nouns.add_parser("gateway", help="run or remove the gateway on this host").add_subparsers(
        dest="verb", metavar="VERB", required=True)
    gr_ = verb(ga, "run", "the controller daemon",
        "Start the gateway: the WireGuard interface, the XDP program (attached and pinned), the "
        "store, the socket, the flow log and the metrics. Runs in the foreground (systemd: "
        "deploy/ztgate.service). Stopping it leaves the policy enforced.",
        "ztgate gateway run --config /etc/ztgate/gateway.yaml")
    gr_.add_argument("--config", metavar="FILE", help="the gateway's configuration (YAML)")
    gr_.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    gr_.set_defaults(run=cmd_gateway_run)
    gt = verb(ga, "teardown", "remove the gateway from this host (the store stays)",
        "Detach the program, delete the interface, remove pins and socket. The database stays in "
        "the state directory; `gateway run` starts again from it.",
        "ztgate gateway teardown --config /etc/ztgate/gateway.yaml")
    gt.add_argument("--config", metavar="FILE")
    gt.set_defaults(run=cmd_gateway_teardown)


