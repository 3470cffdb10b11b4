"""The CLI verbs that watch the running gateway: logs, flows (and flows kill), trace, status,
audit."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from ..api import Client
from ..errors import InputError
from .output import call, keyvalues, print_json, size, table


# ---------------------------------------------------------------------------------------------
# watching

LOG_COLUMNS = [("time", "time"), ("user", "user"), ("device", "device"), ("proto", "proto"), ("from", "source"),
               ("to", "destination"), ("verdict", "verdict"), ("rule", "rule"), ("reason", "reason")]


def _log_row(e: dict) -> dict:
    join = lambda a, p: a if p is None else (f"[{a}]:{p}" if ":" in a else f"{a}:{p}")
    # an allow by a rule by hostname names the learned name it came from, after the rule
    rule = f"{e['rule']} ({e['hostname']})" if e.get("hostname") else e.get("rule")
    return dict(e, time=e["time"][11:23], rule=rule,
                **{"from": join(e["src"], e.get("sport")), "to": join(e["dst"], e.get("dport"))})


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
    r = call(args, "trace", packet=packet)
    if args.json:
        print_json(r)
        return 0
    p = r["packet"]
    ports = p["proto"] in ("tcp", "udp")
    print(f"packet     {p['proto']} {p['src']}{':' + str(p['sport']) if ports else ''} -> "
          f"{p['dst']}{':' + str(p['dport']) if ports else ''}")
    who = r["identity"]
    print(f"identity   " + (f"device {who['device']}, user {who['user']}, groups {', '.join(who['groups']) or '-'}"
                            if who else "none (not the tunnel address of an enabled device)"))
    k, ref = r["kernel"], r["reference"]
    print(f"kernel     {k['verdict'].upper()} by {k['rule'] or k['reason']} (build {k['build']})"
          + (f", as {p['dst']} was learned for {k['hostname']}" if k.get("hostname") else ""))
    agree = (k["verdict"], k["rule"], k["reason"]) == (ref["verdict"], ref["rule"], ref["reason"])
    print(f"reference  {ref['verdict'].upper()} by {ref['rule'] or ref['reason']}"
          + ("" if agree else "   <- DISAGREES with the kernel: please report this"))
    if r["tried"]:
        print("rules tried before it, and why each did not match:")
        table(r["tried"], [("precedence", "prec"), ("rule", "rule"), ("action", "action"), ("why_not", "why not")])
    return 0 if agree else 1


def cmd_status(args) -> int:
    s = call(args, "status")
    if args.json:
        print_json(s)
        return 0
    keyvalues([
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
    rows = call(args, "audit", limit=args.limit)
    if args.json:
        print_json(rows)
        return 0
    table([dict(r, time=datetime.fromtimestamp(r["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                detail=json.dumps(r["detail"])[:100]) for r in rows],
          [("generation", "gen"), ("time", "time (utc)"), ("uid", "uid"), ("what", "what"), ("detail", "detail")])
    return 0


# ---------------------------------------------------------------------------------------------
# conntrack

def cmd_flows(args) -> int:
    if not 1 <= args.limit <= 100000:
        raise InputError("--limit must be from 1 to 100000")
    rows = call(args, "flows", user=args.user, device=args.device, limit=args.limit)
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        r["from"] = _endpoint(r["src"], r["sport"])
        r["to"] = _endpoint(r["dst"], r["dport"])
        r["out"] = f"{r['packets']} / {size(r['bytes'])}"
        r["back"] = f"{r['reply_packets']} / {size(r['reply_bytes'])}"
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
        result = call(args, "flows.kill_of", user=args.kill_user, device=args.kill_device)
        message = f"{result['killed']} flows of {whose} killed: their packets drop both ways"
    else:
        if not args.destination:
            raise InputError("flows kill: give a flow as `ztgate flows` prints it (PROTO SRC:PORT DST:PORT), "
                             "or --user EMAIL or --device NAME")
        src, sport = _split_endpoint(args.source, "source")
        dst, dport = _split_endpoint(args.destination, "destination")
        result = call(args, "flows.kill", proto=args.proto, src=src, sport=sport, dst=dst, dport=dport)
        message = f"flow {args.proto} {args.source} -> {args.destination} killed: its packets drop both ways"
    if args.json:
        print_json(result)
    else:
        print(message)
    return 0
