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
    """Whatever a peer sends, the check answers with a valid request or an InputError."""
    from hypothesis import given, settings, strategies as st

    leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=6) | st.binary(max_size=4)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                         max_leaves=6)
    args = st.dictionaries(st.sampled_from(sorted({k for _, schema, _ in OPS.values() for k in schema} | {"x"})),
                           value, max_size=4)

    @settings(max_examples=1500, deadline=None)
    @given(st.sampled_from(sorted(OPS) + ["nope"]), args)
    def check(op, a):
        try:
            check_request({"op": op, "args": a})
        except InputError:
            pass

    check()
