"""The CLI verbs that talk to the running gateway (control/api.py): each sends one request
and prints the answer, in aligned columns or, with --json, as JSON."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .api import Client
from .errors import InputError, ZtError


def _call(args, op: str, **kw):
    with Client(args.socket) as client:
        return client.call(op, **kw)


def _json(obj) -> None:
    print(json.dumps(obj, indent=None if isinstance(obj, list) else 2, default=str))


def table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Aligned columns: (key, header) pairs; None prints as '-'."""
    cells = [[h.upper() for _, h in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else str(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _keyvalues(pairs: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for k, v in pairs:
        print(f"{k:<{width}}  {'-' if v is None else v}")


def _ago(ts) -> str:
    if not ts:
        return "never"
    s = int(time.time() - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _done(args, result: dict, what: str) -> int:
    if getattr(args, "json", False):
        _json(result)
    elif result.get("unchanged"):
        print(f"{what}: nothing to change (generation {result['generation']})")
    else:
        print(f"{what} (generation {result['generation']})")
    return 0


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
    result = _call(args, "policy.apply", policy_text=texts["policy"], policy_name=args.file,
                   identities_text=texts.get("identities"), identities_name=args.identities, dry_run=args.dry_run)
    if args.json:
        _json(result)
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
    result = _call(args, "policy.show")
    if args.json:
        _json(result)
    else:
        sys.stdout.write(f"# generation {result['generation']}\n" + result["policy"])
    return 0


def cmd_identities_show(args) -> int:
    result = _call(args, "identities.show")
    if args.json:
        _json(result)
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
    rules = _call(args, "rule.list")
    if args.json:
        _json(rules)
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
    result = _call(args, "rule.add", rule=rule)
    return _done(args, result, f"rule {args.name} added at precedence {result['rule']['precedence']}")


def cmd_rule_remove(args) -> int:
    return _done(args, _call(args, "rule.remove", name=args.name), f"rule {args.name} removed")


def cmd_rule_enable(args) -> int:
    return _done(args, _call(args, "rule.set_enabled", name=args.name, enabled=True), f"rule {args.name} enabled")


def cmd_rule_disable(args) -> int:
    return _done(args, _call(args, "rule.set_enabled", name=args.name, enabled=False), f"rule {args.name} disabled")


def cmd_rule_move(args) -> int:
    return _done(args, _call(args, "rule.move", name=args.name, precedence=args.precedence, before=args.before,
                             after=args.after), f"rule {args.name} moved")


# ---------------------------------------------------------------------------------------------
# users, groups

def cmd_user_list(args) -> int:
    users = _call(args, "user.list")
    if args.json:
        _json(users)
    else:
        table([dict(u, groups=",".join(u["groups"]) or None) for u in users],
              [("email", "user"), ("groups", "groups"), ("devices", "devices")])
    return 0


def cmd_user_add(args) -> int:
    return _done(args, _call(args, "user.add", email=args.email, groups=args.group), f"user {args.email} added")


def cmd_user_remove(args) -> int:
    result = _call(args, "user.remove", email=args.email, with_devices=args.with_devices)
    gone = result.get("devices_removed")
    return _done(args, result, f"user {args.email} removed" + (f" with devices {', '.join(gone)}" if gone else ""))


def cmd_group_list(args) -> int:
    groups = _call(args, "group.list")
    if args.json:
        _json(groups)
    else:
        table([dict(g, members=",".join(g["members"]) or None) for g in groups],
              [("name", "group"), ("source", "from"), ("members", "members")])
    return 0


def cmd_group_add(args) -> int:
    return _done(args, _call(args, "group.add", name=args.name), f"group {args.name} added")


def cmd_group_remove(args) -> int:
    return _done(args, _call(args, "group.remove", name=args.name), f"group {args.name} removed")


def cmd_group_add_member(args) -> int:
    return _done(args, _call(args, "group.member", group=args.group, email=args.email, present=True),
                 f"{args.email} is in group {args.group}")


def cmd_group_remove_member(args) -> int:
    return _done(args, _call(args, "group.member", group=args.group, email=args.email, present=False),
                 f"{args.email} left group {args.group}")


# ---------------------------------------------------------------------------------------------
# devices

def cmd_device_list(args) -> int:
    devices = _call(args, "device.list")
    if args.json:
        _json(devices)
        return 0
    table([dict(d, addresses=",".join(d["addresses"]), state="enabled" if d["enabled"] else "disabled",
                handshake=_ago(d["last_handshake"]), rx=_bytes(d["rx_bytes"]), tx=_bytes(d["tx_bytes"]))
           for d in devices],
          [("name", "device"), ("user", "user"), ("addresses", "addresses"), ("state", "state"),
           ("handshake", "handshake"), ("endpoint", "endpoint"), ("rx", "rx"), ("tx", "tx")])
    return 0


def cmd_device_add(args) -> int:
    result = _call(args, "device.add", name=args.name, email=args.user, public_key=args.public_key)
    if args.json:
        _json(result)
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
    return _done(args, _call(args, "device.set_enabled", name=args.name, enabled=False), f"device {args.name} disabled")


def cmd_device_enable(args) -> int:
    return _done(args, _call(args, "device.set_enabled", name=args.name, enabled=True), f"device {args.name} enabled")


def cmd_device_remove(args) -> int:
    return _done(args, _call(args, "device.remove", name=args.name), f"device {args.name} removed")


# ---------------------------------------------------------------------------------------------
# watching

LOG_COLUMNS = [("time", "time"), ("user", "user"), ("device", "device"), ("proto", "proto"), ("from", "source"),
               ("to", "destination"), ("verdict", "verdict"), ("rule", "rule"), ("reason", "reason")]


def _log_row(e: dict) -> dict:
    join = lambda a, p: a if p is None else (f"[{a}]:{p}" if ":" in a else f"{a}:{p}")
    return dict(e, time=e["time"][11:23], **{"from": join(e["src"], e.get("sport")), "to": join(e["dst"], e.get("dport"))})


def _duration(text: str) -> float:
    """30s, 5m, 2h, 1d (or plain seconds, at most ten years) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = -1
    if not 0 < value <= 10 * 365 * 86400:
        raise InputError(f"--since {text!r}: a duration such as 30s, 5m or 2h")
    return value


def cmd_logs(args) -> int:
    if not 1 <= args.limit <= 100000:
        raise InputError("--limit must be from 1 to 100000")
    since = None
    if args.since:
        since = datetime.fromtimestamp(time.time() - _duration(args.since), timezone.utc)
        since = since.isoformat(timespec="microseconds").replace("+00:00", "Z")
    with Client(args.socket) as client:
        # with --since, the last --limit events of that span (the log's tail is searched, not
        # only its last --limit lines)
        first_limit = 100000 if since else args.limit
        ask = lambda cursor: client.call("logs", cursor=cursor, user=args.user, verdict=args.verdict,
                                         device=args.device, limit=first_limit if cursor is None else 1000)
        result = ask(None)
        first = True
        while True:
            events = [e for e in result["events"] if since is None or e["time"] >= since]
            if since and first:
                events = events[-args.limit:]
            if args.json:
                for e in events:
                    print(json.dumps(e), flush=True)
            elif first:
                table([_log_row(e) for e in events], LOG_COLUMNS)   # the header even when empty
            else:
                for e in events:
                    row = _log_row(e)
                    print("  ".join(str(row.get(k) if row.get(k) is not None else "-") for k, _ in LOG_COLUMNS),
                          flush=True)
            if not args.follow:
                return 0
            first = False
            time.sleep(0.5)
            result = ask(result["cursor"])


def cmd_trace(args) -> int:
    packet = {k: getattr(args, k) for k in ("user", "src", "dst", "proto", "sport", "dport")
              if getattr(args, k) is not None}
    r = _call(args, "trace", packet=packet)
    if args.json:
        _json(r)
        return 0
    p = r["packet"]
    ports = p["proto"] in ("tcp", "udp")
    print(f"packet     {p['proto']} {p['src']}{':' + str(p['sport']) if ports else ''} -> "
          f"{p['dst']}{':' + str(p['dport']) if ports else ''}")
    who = r["identity"]
    print(f"identity   " + (f"device {who['device']}, user {who['user']}, groups {', '.join(who['groups']) or '-'}"
                            if who else "none (not the tunnel address of an enabled device)"))
    k, ref = r["kernel"], r["reference"]
    print(f"kernel     {k['verdict'].upper()} by {k['rule'] or k['reason']} (build {k['build']})")
    agree = (k["verdict"], k["rule"], k["reason"]) == (ref["verdict"], ref["rule"], ref["reason"])
    print(f"reference  {ref['verdict'].upper()} by {ref['rule'] or ref['reason']}"
          + ("" if agree else "   <- DISAGREES with the kernel: please report this"))
    if r["tried"]:
        print("rules tried before it, and why each did not match:")
        table(r["tried"], [("precedence", "prec"), ("rule", "rule"), ("action", "action"), ("why_not", "why not")])
    return 0 if agree else 1


def cmd_status(args) -> int:
    s = _call(args, "status")
    if args.json:
        _json(s)
        return 0
    _keyvalues([
        ("interface", f"{s['interface']} ({s['wireguard']} WireGuard), port {s['listen_port']}, "
                      f"addresses {', '.join(s['addresses'])}"),
        ("endpoint", s["endpoint"]),
        ("public key", s["public_key"]),
        ("program", f"id {s['program_id']}, attached {s['attach_mode']}, build {s['build']}"
                    if s["program_id"] else "NOT ATTACHED"),
        ("pinned", f"{s['pin_dir']}: {', '.join(s['pinned'])}"),
        ("generation", s["generation"]),
        ("rules", f"{s['rules_enabled']} enabled of {s['rules']}, default {s['default_action']}"),
        ("users", s["users"]),
        ("groups", s["groups"]),
        ("devices", f"{s['devices']} ({s['devices_enabled']} enabled, {s['devices_online']} online)"),
        ("uptime", f"{s['uptime_seconds']} s"),
    ])
    return 0


def cmd_audit(args) -> int:
    rows = _call(args, "audit", limit=args.limit)
    if args.json:
        _json(rows)
        return 0
    table([dict(r, time=datetime.fromtimestamp(r["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                detail=json.dumps(r["detail"])[:100]) for r in rows],
          [("generation", "gen"), ("time", "time (utc)"), ("uid", "uid"), ("what", "what"), ("detail", "detail")])
    return 0


# ---------------------------------------------------------------------------------------------
# the daemon

def cmd_gateway_run(args) -> int:
    from .config import load_config
    from .daemon import Daemon

    config = load_config(args.config)
    if os.geteuid() != 0:
        raise ZtError("the gateway attaches BPF programs and creates interfaces: run it as root")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Daemon(config).run()
    return 0


def cmd_gateway_teardown(args) -> int:
    from .config import load_config
    from .daemon import teardown

    for line in teardown(load_config(args.config)) or ["nothing to remove"]:
        print(line)
    return 0


# ---------------------------------------------------------------------------------------------
# connectors and routes

def cmd_connector_list(args) -> int:
    rows = _call(args, "connector.list")
    if args.json:
        _json(rows)
        return 0
    for r in rows:
        r["routes"] = ", ".join(r["routes"]) or "-"
        r["handshake"] = _ago(r["last_handshake"])
        r["traffic"] = f"{_bytes(r['rx_bytes'])} in, {_bytes(r['tx_bytes'])} out"
    table(rows, [("name", "name"), ("interface", "interface"), ("listen_port", "port"), ("routes", "routes"),
                 ("endpoint", "endpoint"), ("handshake", "handshake"), ("traffic", "traffic")])
    return 0


def cmd_connector_add(args) -> int:
    result = _call(args, "connector.add", name=args.name, listen_port=args.port)
    if args.json:
        _json(result)
        return 0
    sys.stdout.write(result["config"])
    print(f"ztgate: connector {args.name} added: {result['interface']} listens on port {result['listen_port']}. "
          "The configuration above holds its private key: this is the only copy. Next: "
          f"ztgate route add PREFIX --connector {args.name}", file=sys.stderr)
    return 0


def cmd_connector_remove(args) -> int:
    return _done(args, _call(args, "connector.remove", name=args.name), f"connector {args.name} removed")


def cmd_connector_run(args) -> int:
    from .connector import load_connector_config, run_connector

    return run_connector(load_connector_config(args.config), args.lan)


def cmd_route_list(args) -> int:
    rows = _call(args, "route.list")
    if args.json:
        _json(rows)
        return 0
    for r in rows:
        r["installed"] = "yes" if r["installed"] else "NO"
    table(rows, [("prefix", "prefix"), ("connector", "connector"), ("interface", "interface"),
                 ("installed", "installed")])
    return 0


def cmd_route_add(args) -> int:
    return _done(args, _call(args, "route.add", prefix=args.prefix, connector=args.connector),
                 f"{args.prefix} routed to connector {args.connector}")


def cmd_route_remove(args) -> int:
    return _done(args, _call(args, "route.remove", prefix=args.prefix), f"route {args.prefix} removed")


def cmd_lab(args) -> int:
    from lab import lab

    if args.verb == "status":
        return lab.status(as_json=args.json)
    return {"up": lab.up, "down": lab.down}[args.verb]()


# ---------------------------------------------------------------------------------------------
# conntrack

def cmd_flows(args) -> int:
    if not 1 <= args.limit <= 100000:
        raise InputError("--limit must be from 1 to 100000")
    rows = _call(args, "flows", user=args.user, device=args.device, limit=args.limit)
    if args.json:
        _json(rows)
        return 0
    for r in rows:
        r["from"] = _endpoint(r["src"], r["sport"])
        r["to"] = _endpoint(r["dst"], r["dport"])
        r["out"] = f"{r['packets']} / {_bytes(r['bytes'])}"
        r["back"] = f"{r['reply_packets']} / {_bytes(r['reply_bytes'])}"
    table(rows, [("user", "user"), ("device", "device"), ("proto", "proto"), ("from", "source"),
                 ("to", "destination"), ("rule", "rule"), ("state", "state"), ("age_s", "age s"),
                 ("idle_s", "idle s"), ("out", "out pkts/bytes"), ("back", "back pkts/bytes")])
    return 0


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _split_endpoint(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"{what} {text!r}: ADDRESS:PORT, an IPv6 address in brackets ([fd00:5a::3]:5000), "
                         "as `ztgate flows` prints it")
    return host.strip("[]"), int(port)


def cmd_flows_kill(args) -> int:
    whose = args.kill_user or args.kill_device
    if whose:
        if args.proto:
            raise InputError("flows kill: give either a flow (PROTO SRC:PORT DST:PORT) or --user/--device, not both")
        result = _call(args, "flows.kill_of", user=args.kill_user, device=args.kill_device)
        message = f"{result['killed']} flows of {whose} killed: their packets drop both ways"
    else:
        if not args.destination:
            raise InputError("flows kill: give a flow as `ztgate flows` prints it (PROTO SRC:PORT DST:PORT), "
                             "or --user EMAIL or --device NAME")
        src, sport = _split_endpoint(args.source, "source")
        dst, dport = _split_endpoint(args.destination, "destination")
        result = _call(args, "flows.kill", proto=args.proto, src=src, sport=sport, dst=dst, dport=dport)
        message = f"flow {args.proto} {args.source} -> {args.destination} killed: its packets drop both ways"
    if args.json:
        _json(result)
    else:
        print(message)
    return 0
