"""destination.hostnames in the file format and the reference (spec/POLICY.md, Hostnames)."""
import ipaddress
import json
import subprocess

import pytest
import yaml

from control.errors import InputError
from control.files import load_policy, parse_policy, policy_doc
from control.learned import load_learned
from control.model import TCP, Packet
from control.reference import decide, trace
from tests.examples import LAB
from tests.unit.test_files import ROOT, ZTGATE, assert_refused, policy, write

BAD = [
    ("star-alone", ["*"], "every name"),
    ("star-inside", ["git.*.example"], "leftmost label"),
    ("star-partial", ["*git.corp.example"], "leftmost label"),
    ("underscore", ["_ldap.corp.example"], "letters, digits and hyphens"),
    ("long-label", ["a" * 64 + ".example"], "1-63"),
    ("long-name", [".".join(["a" * 63] * 4) + ".ab"], "at most 253"),
    ("empty-label", ["git..example"], "empty label"),
    ("not-a-string", [42], "not a DNS name"),
    ("not-a-list", "git.corp.example", "must be a list"),
]


@pytest.mark.parametrize("names, says", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_refused(tmp_path, names, says):
    doc = policy({"destination": {"hostnames": names}})
    assert_refused(load_policy, write(tmp_path, "policy.yaml", doc),
                   ["rules[1] (bad)", "destination.hostnames", says])


def test_cli_refuses_with_exit_2(tmp_path):
    bad = write(tmp_path, "policy.yaml", policy({"destination": {"hostnames": ["a.*.b"]}}))
    run = subprocess.run([*ZTGATE, "explain", "--policy", str(bad), "--identities", str(LAB / "identities.yaml"),
                          "--packets", str(LAB / "packets.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stdout == ""
    for part in (str(bad), "rules[1] (bad)", "destination.hostnames", "leftmost label"):
        assert part in run.stderr


def test_round_trip_through_show():
    doc = policy({"destination": {"cidrs": ["10.20.0.0/16"], "except": ["10.20.9.0/24"],
                                  "hostnames": ["Git.Corp.Example", "*.db.corp.example"], "ports": [22]}})
    first = parse_policy(doc)
    assert first.rules[1].dst_hostnames == ("git.corp.example", "*.db.corp.example")
    shown = policy_doc(first)
    assert shown["rules"][1]["destination"]["hostnames"] == ["git.corp.example", "*.db.corp.example"]
    assert parse_policy(yaml.safe_load(yaml.safe_dump(shown))) == first


A, B, C = (ipaddress.ip_address(x) for x in ("10.30.0.1", "10.20.0.5", "10.20.9.9"))
POLICY = parse_policy({
    "version": 1, "default_action": "block", "rules": [
        {"name": "git", "precedence": 10, "action": "allow", "destination": {"hostnames": ["git.corp.example"]}},
        {"name": "no-db", "precedence": 20, "action": "block", "destination": {"hostnames": ["*.db.corp.example"]}},
        {"name": "lan", "precedence": 30, "action": "allow",
         "destination": {"cidrs": ["10.20.0.0/16"], "except": ["10.20.9.0/24"], "hostnames": ["wiki.corp.example"]}},
    ]})


def test_reference_meaning():
    from control.files import parse_identities
    ids = parse_identities({"users": [{"email": "a@x.com"}],
                            "devices": [{"name": "a", "user": "a@x.com", "tunnel_ipv4": "100.96.0.2"}]})
    pkt = lambda dst: Packet(ipaddress.ip_address("100.96.0.2"), dst, TCP, 40000, 22)
    learned = {A: frozenset({"git.corp.example"}), B: frozenset({"x.db.corp.example"}),
               C: frozenset({"wiki.corp.example"})}
    d = decide(POLICY, ids, pkt(A), learned)
    assert (d.verdict, d.rule, d.hostname) == ("allow", "git", "git.corp.example")
    assert decide(POLICY, ids, pkt(A)).rule is None                        # not learned: no name
    d = decide(POLICY, ids, pkt(B), learned)                                # the block by name comes first
    assert (d.verdict, d.rule, d.hostname) == ("block", "no-db", "x.db.corp.example")
    d = decide(POLICY, ids, pkt(B))                                         # unlearned: by the prefix, no name
    assert (d.verdict, d.rule, d.hostname) == ("allow", "lan", None)
    d, misses = trace(POLICY, ids, pkt(C), learned)                         # except holds for names too
    assert d.rule is None and "except" in misses[-1][1]
    assert decide(POLICY, ids, pkt(ipaddress.ip_address("10.40.0.1")), {ipaddress.ip_address("10.40.0.1"):
                                                                         frozenset({"wiki.corp.example"})}).rule == "lan"


def test_learned_file(tmp_path):
    path = tmp_path / "dns.jsonl"
    path.write_text('{"name": "Git.Corp.Example.", "address": "10.30.0.1"}\n\n'
                    '{"name": "x.corp.example", "address": "10.30.0.1"}\n')
    assert load_learned(path) == {A: {"git.corp.example", "x.corp.example"}}
    for bad in ('{"name": "*.corp.example", "address": "10.30.0.1"}', '{"name": "a.b", "address": "nope"}',
                '{"name": "a.b"}', '[1]'):
        path.write_text(bad + "\n")
        with pytest.raises(InputError, match="dns.jsonl:1"):
            load_learned(path)


def test_explain_names_the_learned_name(tmp_path):
    pol = write(tmp_path, "p.yaml", policy_doc(POLICY))
    ids = write(tmp_path, "i.yaml", {"users": [{"email": "a@x.com"}],
                                     "devices": [{"name": "a", "user": "a@x.com", "tunnel_ipv4": "100.96.0.2"}]})
    dns = tmp_path / "dns.jsonl"
    dns.write_text(json.dumps({"name": "git.corp.example", "address": "10.30.0.1"}) + "\n")
    run = subprocess.run([*ZTGATE, "explain", "--policy", str(pol), "--identities", str(ids), "--dns", str(dns),
                          "--src", "100.96.0.2", "--dst", "10.30.0.1", "--dport", "22"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ALLOW by rule git, as 10.30.0.1 was learned for git.corp.example" in run.stdout


def test_a_trailing_dot_is_the_same_name():
    """spec/POLICY.md: names compare case-insensitively, without a trailing dot."""
    doc = policy({"destination": {"hostnames": ["Git.Corp.Example.", "*.db.corp.example."]}})
    assert parse_policy(doc).rules[1].dst_hostnames == ("git.corp.example", "*.db.corp.example")
