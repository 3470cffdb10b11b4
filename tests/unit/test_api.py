"""The socket's framing and request checks, and the gateway's config file: every bad input
is refused with a message that names what to change."""
import socket
import struct

import msgpack
import pytest

from control.api import MAX_FRAME, FrameError, read_frame, write_frame
from control.config import Config, parse_config
from control.errors import InputError
from control.server import OPS, check_request


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(2)
    b.settimeout(2)
    return a, b


def test_frames_round_trip():
    a, b = pair()
    write_frame(a, {"op": "status", "args": {}})
    assert read_frame(b) == {"op": "status", "args": {}}
    a.close()
    assert read_frame(b) is None      # a clean close between frames


@pytest.mark.parametrize("raw, what", [
    (struct.pack(">I", MAX_FRAME + 1), "larger than the limit"),
    (struct.pack(">I", 10) + b"abc", "closed inside a frame"),
    (b"\x00\x00", "closed inside a frame"),
    (struct.pack(">I", 1) + b"\xc1", "not valid msgpack"),       # 0xc1 is never used
    (struct.pack(">I", 3) + msgpack.packb({1: 2}), "not valid msgpack"),   # non-string map keys
])
def test_bad_frames_are_frame_errors(raw, what):
    a, b = pair()
    a.sendall(raw)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError, match=what):
        read_frame(b)


@pytest.mark.parametrize("req, what", [
    ([1, 2], "a request is a map"),
    ({"op": "status", "extra": 1}, "unknown key 'extra'"),
    ({"op": "drop.tables"}, "unknown op 'drop.tables'"),
    ({"op": 7}, "unknown op 7"),
    ({"op": "device.add", "args": []}, "args must be a map"),
    ({"op": "device.add", "args": {"name": "x"}}, "email is required"),
    ({"op": "device.add", "args": {"name": 5, "email": "a@b"}}, "name must be str, got int"),
    ({"op": "device.add", "args": {"name": "x", "email": "a@b", "colour": "red"}}, "unknown argument 'colour'"),
    ({"op": "rule.set_enabled", "args": {"name": "x", "enabled": 1}}, "enabled must be bool"),
    ({"op": "rule.move", "args": {"name": "x", "precedence": True}}, "precedence must be int, got bool"),
    ({"op": "audit", "args": {"limit": 0}}, "limit must be from 1"),
    ({"op": "user.add", "args": {"email": "a@b", "groups": [1]}}, "groups must be a list of names"),
])
def test_bad_requests_are_refused_by_name(req, what):
    with pytest.raises(InputError, match=what):
        check_request(req)


def test_good_request_gets_defaults():
    handler, args, changes = check_request({"op": "policy.apply", "args": {"policy_text": "", "policy_name": "p"}})
    assert handler == "policy_apply" and changes
    assert args == {"policy_text": "", "policy_name": "p", "identities_text": None, "identities_name": None,
                    "dry_run": False}
    assert all(not changes for op, (_, _, changes) in OPS.items() if op.endswith((".list", ".show")))


def test_config_defaults_and_addresses():
    c = parse_config({"endpoint": "198.18.0.1:51820", "routes": ["10.20.0.0/16"]})
    assert [str(a) for a in c.gateway_addresses] == ["100.96.0.1/12", "fd00:5a::1/64"]
    assert c.pool_size == 1 << 20 and c == Config(endpoint="198.18.0.1:51820", routes=c.routes)
    assert parse_config({"pool_ipv6": None}).gateway_addresses[-1].version == 4
    ct = dict(parse_config({"conntrack": {"udp": 30}}).conntrack)
    assert ct == {"entries": 65536, "tcp": 3600, "tcp_closing": 10, "udp": 30, "icmp": 30}


@pytest.mark.parametrize("doc, what", [
    ([1], "must be a mapping"),
    ({"listen_prot": 1}, "unknown setting 'listen_prot'"),
    ({"listen_port": 70000}, "listen_port: must be an integer from 1 to 65535"),
    ({"interface": "a-very-long-interface-name"}, "not a Linux interface name"),
    ({"endpoint": "gw.example.com"}, "is not HOST:PORT"),
    ({"pool_ipv4": "100.96.0.1/12"}, "not an IPv4 prefix"),
    ({"pool_ipv4": "fd00::/64"}, "not an IPv4 prefix"),
    ({"pool_ipv4": "100.0.0.0/8"}, "at most 2\\^20 addresses"),
    ({"pool_ipv4": "100.96.0.0/31"}, "too small for devices"),
    ({"routes": "10.0.0.0/8"}, "must be a list"),
    ({"routes": ["10.0.0.1/8"]}, "not a prefix"),
    ({"xdp_mode": "fast"}, "use auto, native or generic"),
    ({"metrics": "9469"}, "not ADDRESS:PORT"),
    ({"route_table": 254}, "the kernel's own"),
    ({"conntrack": [1]}, "conntrack: must be a mapping"),
    ({"conntrack": {"tcp_open": 5}}, "unknown timeout 'tcp_open'"),
    ({"conntrack": {"udp": 0}}, "conntrack.udp: must be seconds from 1"),
    ({"conntrack": {"entries": 10}}, "conntrack.entries: must be flows from 1024"),
    ({"route_table": 0}, "route_table: must be an integer from 1"),
    ({"route_priority": 32766}, "route_priority: must be an integer from 2 to 32765"),
])
def test_bad_config_is_refused(doc, what):
    with pytest.raises(InputError, match=what):
        parse_config(doc, "gw.yaml")


def test_check_request_refuses_anything_else_with_input_error():
    """Whatever a peer sends, the check answers with a valid request or a refusal.

    A refusal (control/api.py) is an InputError, exit status 2: the server replies
    {"ok": false, "status": 2, "error": MESSAGE} and the client raises InputError again; its
    message starts with the op (or "request:" for an op there is none of) and names the argument
    to change; and it changes nothing: the check runs before any handler, and leaves the
    request as it came. What the check accepts fits its op's schema: a known op, no argument
    the op does not have, every required one given, each of its type (an int is no bool), the
    values given passed on unchanged, a limit from 1 to 100000, a cursor of two 64-bit numbers,
    groups of names. A check that accepted everything fails here (so does one that skipped any
    of those checks: each was tried by breaking control/server.py's check_request)."""
    import copy

    from hypothesis import given, settings, strategies as st

    leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6) | st.binary(max_size=4)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=6)
    args = st.dictionaries(st.sampled_from(sorted({k for _, schema, _ in OPS.values() for k in schema} | {"x"})),
                           value, max_size=4)
    # Also the op's own arguments, mostly of their type or one that looks like it (a bool for an
    # int, bytes for a str, numbers in a list): requests one detail away from valid.
    typed = {str: st.text(max_size=6) | st.binary(max_size=4), int: st.integers(-(2**63), 2**64 - 1) | st.booleans(),
             bool: st.booleans() | st.integers(0, 1), dict: st.dictionaries(st.text(max_size=6), value, max_size=3),
             list: st.lists(st.integers(-1, 2**64) | leaf, max_size=3)}

    def near(op):
        schema = OPS[op][1] if op in OPS else {}
        return st.fixed_dictionaries({}, optional={k: typed[kind] for k, (kind, _) in schema.items()})

    @settings(max_examples=1500, deadline=None)
    @given(st.data())
    def check(data):
        op = data.draw(st.sampled_from(sorted(OPS) + ["nope"]), "op")
        a = data.draw(st.one_of(args, near(op), near(op)), "args")      # two in three near
        req = {"op": op, "args": a}
        sent = copy.deepcopy(req)
        try:
            handler, out, changes = check_request(req)
        except InputError as e:
            assert req == sent, "a refused request was changed"
            assert e.exit_status == 2
            message = str(e)
            if op not in OPS:
                assert message.startswith(f"request: unknown op {op!r}"), message
                return
            assert message.startswith(f"{op}: "), message
            assert any(f"{k!r}" in message or f"{k} " in message for k in {*a, *OPS[op][1]}), \
                f"{message!r} names no argument"
            return
        assert req == sent, "an accepted request was changed"
        assert op in OPS, f"accepted an unknown op {op!r}"
        name, schema, changing = OPS[op]
        assert (handler, changes) == (name, changing)
        assert set(a) <= set(schema), f"{op}: accepted unknown arguments {sorted(set(a) - set(schema))}"
        assert set(out) == set(schema)
        for key, (kind, required) in schema.items():
            if a.get(key) is None:
                assert not required, f"{op}: accepted without its required {key}"
            else:
                assert out[key] == a[key], f"{op}: {key} changed from {a[key]!r} to {out[key]!r}"
            if out[key] is not None:
                assert isinstance(out[key], kind) and not (kind is int and isinstance(out[key], bool)), \
                    f"{op}: accepted {key}={out[key]!r}, not a {kind.__name__}"
        assert out.get("limit") is None or 1 <= out["limit"] <= 100000, out
        assert out.get("cursor") is None or (len(out["cursor"]) == 2 and all(
            type(c) is int and 0 <= c < 2**64 for c in out["cursor"])), out
        assert all(isinstance(g, str) for g in out.get("groups") or []), out

    check()
