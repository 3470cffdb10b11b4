"""POLICY.md "Validation": every refusal names the file, the entry (rule/user/device) and the field."""
import base64
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control.errors import InputError
from control.files import load_identities, load_policy
from control.model import Packet
from control.reference import decide
from tests.examples import LAB

ROOT = Path(__file__).resolve().parents[2]
ZTGATE = [sys.executable, "-m", "control.cli"]   # the console script's entry point


def policy(bad_rule=None, **top):
    """A valid policy; bad_rule (if given) is merged into a second rule, rules[1] named 'bad'."""
    rules = [{"name": "first", "precedence": 1, "action": "allow"}]
    if bad_rule is not None:
        rules.append({"name": "bad", "precedence": 2, "action": "allow", **bad_rule})
    return {"version": 1, "default_action": "block", "rules": rules, **top}


def identities(user=None, device=None, **top):
    """Valid identities; user/device (if given) is appended as users[2] / devices[1]."""
    users = [{"email": "alice@example.com", "groups": ["developers"]}, {"email": "bob@example.com"}]
    devices = [{"name": "alice-laptop", "user": "alice@example.com",
                "tunnel_ipv4": "100.96.0.2", "tunnel_ipv6": "fd00:5a::2"}]
    users += [user] if user is not None else []
    devices += [{"name": "bob-laptop", "user": "bob@example.com", "tunnel_ipv4": "100.96.0.3", **device}] if device is not None else []
    return {"users": users, "devices": devices, **top}


KEY = base64.b64encode(bytes(range(32))).decode()
KEY31 = base64.b64encode(bytes(31)).decode()


def with_alice_key(doc: dict, key: str) -> dict:
    doc["devices"][0]["public_key"] = key
    return doc


def write(tmp_path, name, doc) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


# (id, policy document, substrings the message must hold besides the file path)
BAD_POLICIES = [
    ("unknown-top-key", policy(colour="red"), ["colour"]),
    ("unknown-rule-key", policy({"colour": "red"}), ["rules[1]", "colour"]),
    ("unknown-source-key", policy({"source": {"cidr": ["10.0.0.0/8"]}}), ["rules[1]", "bad", "source", "cidr"]),
    ("unknown-destination-key", policy({"destination": {"port": [22]}}), ["rules[1]", "bad", "destination", "port"]),
    ("duplicate-name", policy({"name": "first"}), ["rules[1]", "first", "name"]),
    ("duplicate-precedence", policy({"precedence": 1}), ["rules[1]", "bad", "precedence"]),
    ("principal-role", policy({"principals": ["role:admin"]}), ["rules[1]", "bad", "principals", "role:admin"]),
    ("principal-bare-email", policy({"principals": ["bob@example.com"]}), ["rules[1]", "bad", "principals"]),
    ("principal-empty-name", policy({"principals": ["group:"]}), ["rules[1]", "bad", "principals"]),
    ("prefix-malformed", policy({"destination": {"cidrs": ["10.0.0.0/33"]}}), ["rules[1]", "bad", "destination.cidrs"]),
    ("prefix-garbage", policy({"source": {"cidrs": ["banana"]}}), ["rules[1]", "bad", "source.cidrs", "banana"]),
    ("prefix-v4-host-bits", policy({"destination": {"cidrs": ["10.20.0.1/16"]}}), ["rules[1]", "destination.cidrs", "host bits"]),
    ("prefix-v6-host-bits", policy({"source": {"cidrs": ["fd20::1/64"]}}), ["rules[1]", "source.cidrs", "host bits"]),
    ("except-host-bits", policy({"destination": {"cidrs": ["10.0.0.0/8"], "except": ["10.20.99.1/24"]}}),
     ["rules[1]", "destination.except", "host bits"]),
    ("port-negative", policy({"destination": {"ports": [-1]}}), ["rules[1]", "bad", "destination.ports"]),
    ("port-65536", policy({"destination": {"ports": [65536]}}), ["rules[1]", "bad", "destination.ports", "65536"]),
    ("port-string-65536", policy({"source": {"ports": ["65536"]}}), ["rules[1]", "bad", "source.ports"]),
    ("range-end-65536", policy({"destination": {"ports": ["1024-65536"]}}), ["rules[1]", "destination.ports"]),
    ("range-reversed", policy({"destination": {"ports": ["8080-8000"]}}), ["rules[1]", "bad", "destination.ports", "8080-8000"]),
    ("range-reversed-by-one", policy({"source": {"ports": ["23-22"]}}), ["rules[1]", "bad", "source.ports", "23-22"]),
    ("ports-with-icmp", policy({"protocols": ["icmp"], "destination": {"ports": [22]}}), ["rules[1]", "bad", "destination.ports"]),
    ("source-ports-with-icmp", policy({"protocols": ["icmp"], "source": {"ports": [22]}}), ["rules[1]", "bad", "source.ports"]),
    ("unknown-action", policy({"action": "deny"}), ["rules[1]", "bad", "action", "deny"]),
    ("unknown-default-action", policy(default_action="deny"), ["default_action", "deny"]),
    ("unknown-protocol", policy({"protocols": ["tcp", "sctp"]}), ["rules[1]", "bad", "protocols", "sctp"]),
    ("group-name-with-escape", policy(groups={"ops\x1b[2J": ["alice@example.com"]}), ["groups", "control character"]),
]

BAD_IDENTITIES = [
    ("unknown-top-key", identities(groups=[]), ["groups"]),
    ("unknown-user-key", identities(user={"email": "carol@example.com", "phone": "555"}), ["users[2]", "phone"]),
    ("unknown-device-key", identities(device={"colour": "red"}), ["devices[1]", "colour"]),
    ("unknown-owner", identities(device={"user": "mallory@example.com"}), ["devices[1]", "user", "mallory@example.com"]),
    ("duplicate-tunnel-ipv4", identities(device={"tunnel_ipv4": "100.96.0.2"}), ["devices[1]", "tunnel_ipv4", "100.96.0.2"]),
    ("duplicate-tunnel-ipv6", identities(device={"tunnel_ipv6": "fd00:5a::2"}), ["devices[1]", "tunnel_ipv6", "fd00:5a::2"]),
    ("duplicate-device-name", identities(device={"name": "alice-laptop"}), ["devices[1]", "name", "alice-laptop"]),
    ("duplicate-email", identities(user={"email": "Alice@Example.COM"}), ["users[2]", "email"]),
    ("public-key-not-base64", identities(device={"public_key": "junk"}), ["devices[1]", "public_key", "junk", "44 characters"]),
    ("public-key-31-bytes", identities(device={"public_key": KEY31}), ["devices[1]", "public_key", "31 bytes"]),
    ("public-key-twice", with_alice_key(identities(device={"public_key": KEY}), KEY),
     ["devices[1]", "public_key", "alice-laptop", "a key of its own"]),
    ("email-with-escape", identities(user={"email": "eve\x1b]0;owned\x07@example.com"}), ["users[2]", "email", "control character"]),
    ("group-with-bidi-override", identities(user={"email": "carol@example.com", "groups": ["dev\u202eops"]}),
     ["users[2]", "groups", "control character"]),
]


def assert_refused(load, path: Path, expected: list[str]) -> None:
    with pytest.raises(InputError) as info:
        load(path)
    message = str(info.value)
    for part in [str(path)] + expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("doc, expected", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_policy_refused(tmp_path, doc, expected):
    assert_refused(load_policy, write(tmp_path, "policy.yaml", doc), expected)


@pytest.mark.parametrize("doc, expected", [c[1:] for c in BAD_IDENTITIES], ids=[c[0] for c in BAD_IDENTITIES])
def test_identities_refused(tmp_path, doc, expected):
    assert_refused(load_identities, write(tmp_path, "identities.yaml", doc), expected)


def test_base_documents_are_valid(tmp_path):
    """The tables above fail for their mutation, not for the base they mutate."""
    assert len(load_policy(write(tmp_path, "p.yaml", policy({"name": "second"}))).rules) == 2
    assert len(load_identities(write(tmp_path, "i.yaml", identities({"email": "c@example.com"}, {}))).devices) == 2


# ------------------------------------------------------------------------------------------------
# The same refusals through the real CLI: exit status 2 and the message on stderr.

CLI_CASES = [c for c in BAD_POLICIES if c[0] in ("unknown-rule-key", "prefix-v4-host-bits", "range-reversed", "ports-with-icmp")]


@pytest.mark.parametrize("doc, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_policy(tmp_path, doc, expected):
    bad = write(tmp_path, "policy.yaml", doc)
    run = subprocess.run([*ZTGATE, "explain", "--policy", str(bad), "--identities", str(LAB / "identities.yaml"),
                          "--packets", str(LAB / "packets.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    for part in [str(bad)] + expected:
        assert part in run.stderr


def test_cli_refuses_bad_identities(tmp_path):
    bad = write(tmp_path, "identities.yaml", identities(device={"tunnel_ipv6": "fd00:5a::2"}))
    run = subprocess.run([*ZTGATE, "explain", "--policy", str(LAB / "policy.yaml"), "--identities", str(bad),
                          "--packets", str(LAB / "packets.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    for part in (str(bad), "devices[1]", "tunnel_ipv6"):
        assert part in run.stderr


# ------------------------------------------------------------------------------------------------
# What must be accepted.

def test_lab_examples_load():
    pol, ids = load_policy(LAB / "policy.yaml"), load_identities(LAB / "identities.yaml")
    assert [r.name for r in pol.rules] == ["devs-app", "devs-echo", "staff-web", "staff-dns", "staff-wiki-by-name"]
    assert pol.default_action == "block"
    assert [d.name for d in ids.devices] == ["alice-laptop", "bob-laptop"]
    assert ids.devices[0].tunnel_ipv6 == ipaddress.ip_address("fd00:5a::2")


def test_ports_forms(tmp_path):
    doc = policy({"protocols": ["tcp"], "source": {"ports": [0, "1024-65535"]},
                  "destination": {"ports": [22, "22", "8000-8080", " 9000 - 9001 ", "65535-65535"]}})
    rule = load_policy(write(tmp_path, "policy.yaml", doc)).rules[1]
    assert rule.dst_ports == ((22, 22), (22, 22), (8000, 8080), (9000, 9001), (65535, 65535))
    assert rule.src_ports == ((0, 0), (1024, 65535))


def test_unquoted_yaml_range(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("rules:\n  - {name: r, precedence: 1, action: allow, destination: {ports: [22, 8000-8080]}}\n")
    assert load_policy(path).rules[0].dst_ports == ((22, 22), (8000, 8080))


def test_emails_compare_case_insensitively(tmp_path):
    ids = load_identities(write(tmp_path, "i.yaml", {
        "users": [{"email": "Alice@Example.com"}],
        "devices": [{"name": "a", "user": "ALICE@example.COM", "tunnel_ipv4": "100.96.0.2"}]}))
    pol = load_policy(write(tmp_path, "p.yaml", {
        "groups": {"oncall": ["aLiCe@example.com"]},
        "rules": [{"name": "by-user", "precedence": 1, "action": "allow", "principals": ["user:alice@EXAMPLE.com"],
                   "destination": {"cidrs": ["10.0.0.1/32"]}},
                  {"name": "by-local-group", "precedence": 2, "action": "allow", "principals": ["group:oncall"]}]}))
    tcp = lambda dst: Packet(ipaddress.ip_address("100.96.0.2"), ipaddress.ip_address(dst), 6, 1000, 22)
    assert decide(pol, ids, tcp("10.0.0.1")).rule == "by-user"
    assert decide(pol, ids, tcp("10.0.0.2")).rule == "by-local-group"


def test_emails_are_ascii_and_fold_ascii_only():
    """K (U+212A, KELVIN SIGN).lower() is an ASCII k: such an address would be another user's."""
    from control.files import parse_identities
    from control.model import Identities, User, fold
    with pytest.raises(InputError, match="only ASCII email addresses.*ASCII address or alias"):
        parse_identities({"users": [{"email": "\u212aarl@example.com"}]})
    assert fold("\u212aarl@Example.COM") == "\u212aarl@example.com" and fold("Karl@X.org") == "karl@x.org"
    ids = Identities((User("karl@example.com", ()),), ())
    assert ids.find_user("KARL@example.com") is not None and ids.find_user("\u212aarl@example.com") is None
def test_check_rules_names_the_duplicate_as_before():
    """check_rules (a rule change's whole list) checks at C speed, and still names the rule
    and the field of a duplicate as the per-rule check did."""
    from control.files import check_rules
    from control.model import Rule

    rules = [Rule("a", 1, "allow"), Rule("b", 2, "allow")]
    check_rules(rules, "request")
    with pytest.raises(InputError) as name:
        check_rules(rules + [Rule("a", 3, "block")], "request")
    with pytest.raises(InputError) as precedence:
        check_rules(rules + [Rule("c", 2, "block")], "request")
    assert "rules[2] (a)" in str(name.value) and "duplicate rule name (also rules[0])" in str(name.value)
    assert "rules[2] (c)" in str(precedence.value) and "duplicate precedence 2 (also rule 'b')" in str(precedence.value)
