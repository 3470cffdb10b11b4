"""The CLI verbs that change (or show) the running gateway: policy, rules, users, groups,
devices, connectors and routes; and the daemon itself (gateway run, teardown) and the lab.
Each sends one request and prints the answer, in aligned columns or, with --json, as JSON."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import InputError, ZtError
from .output import ago, call, done, print_json, size, table
from .sessions import session_column


# ---------------------------------------------------------------------------------------------
# policy

def cmd_policy_apply(args) -> int:
    texts = {}
    for key, path in (("policy", args.file), ("identities", args.identities)):
        if path is not None:
            try:
                texts[key] = Path(path).read_text()
            except OSError as e:
                raise InputError(f"{path}: cannot read: {e.strerror}") from None
    result = call(args, "policy.apply", policy_text=texts["policy"], policy_name=args.file,
                   identities_text=texts.get("identities"), identities_name=args.identities, dry_run=args.dry_run)
    if args.json:
        print_json(result)
        return 0
    for line in result["changes"]:
        print(line)
    if not result["changes"]:
        print(f"no changes: the gateway already runs this (generation {result['generation']})")
    elif result["applied"]:
        print(f"applied: {len(result['changes'])} changes, generation {result['generation']}")
    else:
        print(f"dry run: {len(result['changes'])} changes, nothing applied")
    return 0


def cmd_policy_show(args) -> int:
    result = call(args, "policy.show")
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(f"# generation {result['generation']}\n" + result["policy"])
    return 0


def cmd_identities_show(args) -> int:
    result = call(args, "identities.show")
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(f"# generation {result['generation']}\n" + result["identities"])
    return 0


# ---------------------------------------------------------------------------------------------
# rules

def _summary(rule: dict) -> dict:
    src, dst = rule.get("source", {}), rule.get("destination", {})
    join = lambda v: ",".join(map(str, v)) if v is not None else "any"
    dest = join(dst.get("cidrs"))
    if dst.get("except"):
        dest += " except " + join(dst["except"])
    return dict(rule, who=join(rule.get("principals") or None), proto=join(rule.get("protocols")),
                dst=dest, dports=join(dst.get("ports")),
                src=join(src.get("cidrs")) + (":" + join(src["ports"]) if src.get("ports") else ""),
                state="on" if rule["enabled"] else "off")


def cmd_rule_list(args) -> int:
    rules = call(args, "rule.list")
    if args.json:
        print_json(rules)
        return 0
    table([_summary(r) for r in rules],
          [("precedence", "prec"), ("name", "name"), ("action", "action"), ("state", "on"), ("who", "principals"),
           ("proto", "proto"), ("src", "source"), ("dst", "destination"), ("dports", "ports"),
           ("packets", "packets"), ("bytes", "bytes")])
    return 0


def cmd_rule_add(args) -> int:
    rule: dict = {"name": args.name, "action": args.action}
    if args.precedence is not None:
        rule["precedence"] = args.precedence
    if args.disabled:
        rule["enabled"] = False
    if args.principal:
        rule["principals"] = args.principal
    if args.proto:
        rule["protocols"] = [p.strip() for item in args.proto for p in item.split(",")]
    ports = lambda items: [int(p) if p.strip().isdigit() else p.strip() for item in items for p in item.split(",")]
    src = {k: v for k, v in (("cidrs", args.src_cidr), ("ports", args.src_port and ports(args.src_port))) if v}
    dst = {k: v for k, v in (("cidrs", args.dst_cidr), ("except", args.dst_except),
                             ("ports", args.dst_port and ports(args.dst_port))) if v}
    if src:
        rule["source"] = src
    if dst:
        rule["destination"] = dst
    result = call(args, "rule.add", rule=rule)
    return done(args, result, f"rule {args.name} added at precedence {result['rule']['precedence']}")


def cmd_rule_remove(args) -> int:
    return done(args, call(args, "rule.remove", name=args.name), f"rule {args.name} removed")


def cmd_rule_enable(args) -> int:
    return done(args, call(args, "rule.set_enabled", name=args.name, enabled=True), f"rule {args.name} enabled")


def cmd_rule_disable(args) -> int:
    return done(args, call(args, "rule.set_enabled", name=args.name, enabled=False), f"rule {args.name} disabled")


def cmd_rule_move(args) -> int:
    return done(args, call(args, "rule.move", name=args.name, precedence=args.precedence, before=args.before,
                             after=args.after), f"rule {args.name} moved")


# ---------------------------------------------------------------------------------------------
# users, groups

def cmd_user_list(args) -> int:
    users = call(args, "user.list")
    if args.json:
        print_json(users)
    else:
        table([dict(u, groups=",".join(u["groups"]) or None) for u in users],
              [("email", "user"), ("groups", "groups"), ("devices", "devices")])
    return 0


def cmd_user_add(args) -> int:
    return done(args, call(args, "user.add", email=args.email, groups=args.group), f"user {args.email} added")


def cmd_user_remove(args) -> int:
    result = call(args, "user.remove", email=args.email, with_devices=args.with_devices)
    gone = result.get("devices_removed")
    return done(args, result, f"user {args.email} removed" + (f" with devices {', '.join(gone)}" if gone else ""))


def cmd_group_list(args) -> int:
    groups = call(args, "group.list")
    if args.json:
        print_json(groups)
    else:
        table([dict(g, members=",".join(g["members"]) or None) for g in groups],
              [("name", "group"), ("source", "from"), ("members", "members")])
    return 0


def cmd_group_add(args) -> int:
    return done(args, call(args, "group.add", name=args.name), f"group {args.name} added")


def cmd_group_remove(args) -> int:
    return done(args, call(args, "group.remove", name=args.name), f"group {args.name} removed")


def cmd_group_add_member(args) -> int:
    return done(args, call(args, "group.member", group=args.group, email=args.email, present=True),
                 f"{args.email} is in group {args.group}")


def cmd_group_remove_member(args) -> int:
    return done(args, call(args, "group.member", group=args.group, email=args.email, present=False),
                 f"{args.email} left group {args.group}")


# ---------------------------------------------------------------------------------------------
# devices

def cmd_device_list(args) -> int:
    devices = call(args, "device.list")
    if args.json:
        print_json(devices)
        return 0
    table([dict(d, addresses=",".join(d["addresses"]), state="enabled" if d["enabled"] else "disabled",
                handshake=ago(d["last_handshake"]), rx=size(d["rx_bytes"]), tx=size(d["tx_bytes"]),
                session=session_column(d.get("session_expires")))
           for d in devices],
          [("name", "device"), ("user", "user"), ("addresses", "addresses"), ("state", "state"),
           ("session", "session"), ("handshake", "handshake"), ("endpoint", "endpoint"), ("rx", "rx"),
           ("tx", "tx")])
    return 0


def cmd_device_add(args) -> int:
    result = call(args, "device.add", name=args.name, email=args.user, public_key=args.public_key)
    if args.json:
        print_json(result)
        return 0
    where = ", ".join(result["addresses"])
    if "config" in result:
        sys.stdout.write(result["config"])
        print(f"ztgate: device {args.name} enrolled for {result['user']} at {where}. The configuration above "
              "holds its private key: this is the only copy.", file=sys.stderr)
    else:
        print(f"device {args.name} enrolled for {result['user']} at {where} (generation {result['generation']})")
    return 0


def cmd_device_disable(args) -> int:
    return done(args, call(args, "device.set_enabled", name=args.name, enabled=False), f"device {args.name} disabled")


def cmd_device_enable(args) -> int:
    return done(args, call(args, "device.set_enabled", name=args.name, enabled=True), f"device {args.name} enabled")


def cmd_device_remove(args) -> int:
    return done(args, call(args, "device.remove", name=args.name), f"device {args.name} removed")


# ---------------------------------------------------------------------------------------------
# the daemon

def cmd_gateway_run(args) -> int:
    from ..config import load_config
    from ..daemon import Daemon

    config = load_config(args.config)
    if os.geteuid() != 0:
        raise ZtError("the gateway attaches BPF programs and creates interfaces: run it as root")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Daemon(config).run()
    return 0


def cmd_gateway_teardown(args) -> int:
    from ..config import load_config
    from ..daemon import teardown

    for line in teardown(load_config(args.config)) or ["nothing to remove"]:
        print(line)
    return 0


# ---------------------------------------------------------------------------------------------
# connectors and routes

def cmd_connector_list(args) -> int:
    rows = call(args, "connector.list")
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        r["routes"] = ", ".join(r["routes"]) or "-"
        r["handshake"] = ago(r["last_handshake"])
        r["traffic"] = f"{size(r['rx_bytes'])} in, {size(r['tx_bytes'])} out"
    table(rows, [("name", "name"), ("interface", "interface"), ("listen_port", "port"), ("routes", "routes"),
                 ("endpoint", "endpoint"), ("handshake", "handshake"), ("traffic", "traffic")])
    return 0


def cmd_connector_add(args) -> int:
    result = call(args, "connector.add", name=args.name, listen_port=args.port)
    if args.json:
        print_json(result)
        return 0
    sys.stdout.write(result["config"])
    print(f"ztgate: connector {args.name} added: {result['interface']} listens on port {result['listen_port']}. "
          "The configuration above holds its private key: this is the only copy. Next: "
          f"ztgate route add PREFIX --connector {args.name}", file=sys.stderr)
    return 0


def cmd_connector_remove(args) -> int:
    return done(args, call(args, "connector.remove", name=args.name), f"connector {args.name} removed")


def cmd_connector_run(args) -> int:
    from ..connector import load_connector_config, run_connector

    return run_connector(load_connector_config(args.config), args.lan)


def cmd_route_list(args) -> int:
    rows = call(args, "route.list")
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        r["installed"] = "yes" if r["installed"] else "NO"
    table(rows, [("prefix", "prefix"), ("connector", "connector"), ("interface", "interface"),
                 ("installed", "installed")])
    return 0


def cmd_route_add(args) -> int:
    return done(args, call(args, "route.add", prefix=args.prefix, connector=args.connector),
                 f"{args.prefix} routed to connector {args.connector}")


def cmd_route_remove(args) -> int:
    return done(args, call(args, "route.remove", prefix=args.prefix), f"route {args.prefix} removed")


def cmd_lab(args) -> int:
    from lab import lab

    if args.verb == "status":
        return lab.status(as_json=args.json)
    return {"up": lab.up, "down": lab.down}[args.verb]()
