"""The fast paths of reading files (control/yamlfile.py's FastSafeLoader, control/files.py's
checks of names and addresses) give what the general paths give: the same documents and
values for valid input, the same refusal (words, line number) for invalid input."""
import ipaddress
import unicodedata

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from control.errors import InputError
from control.files import _address, _string, _Where, parse_identities, unprintable
from control.yamlfile import FAST_LOADER, parse_yaml

TRICKY = """
base: &base {name: dev0, user: "user0@example.com", enabled: yes}
copy: *base
merged: {<<: *base, name: dev1}
list: &l [a, 'b', "c", 1, 0x10, 0o7, 017, 1_000, 1:20, -1.5e+3, .inf, .NaN, ~, null, Null, '', true, On, off, "yes"]
same-list: *l
strings: [yes, "yes", 'yes', !!str yes, !!str 12, !!int "12", !!float "1", 2024-01-31, "2024-01-31", 2001-12-14t21:59:43.10-05:00]
block: |
  two lines
  of text
folded: >
  folded
  text
binary: !!binary aGVsbG8=
set: !!set {a, b}
omap: !!omap [{a: 1}, {b: 2}]
pairs: !!pairs [{a: 1}, {a: 2}]
nested: {a: [{b: {c: [d, {e: f}]}}]}
strings-only: &s {a: b, c: d, a: e}
strings-again: *s
seq-only: &q [a, b, 'c']
seq-again: *q
merge-strings: {<<: *s, x: y}
"with: colon": "x\\ty\\u00e9"
= : value key
dup: 1
dup: 2
"""


def fast(text):
    return yaml.load(text, Loader=FAST_LOADER)


def test_fast_loader_reads_what_the_python_loader_reads():
    assert FAST_LOADER is not None
    assert fast(TRICKY) == yaml.safe_load(TRICKY) == yaml.load(TRICKY, Loader=yaml.CSafeLoader)


@pytest.mark.parametrize("text", ["? [complex, key]\n: value", "a: !!python/name:os.system x",
                                  "a: {<<: [1]}", "a: *nowhere",
                                  "a: !!seq {b: c}", "a: !!map [b, c]", "a: !!str [b]"])
def test_fast_loader_refuses_what_the_python_loader_refuses(text):
    with pytest.raises(yaml.YAMLError) as python:
        yaml.safe_load(text)
    with pytest.raises(yaml.YAMLError):
        fast(text)
    with pytest.raises(InputError) as ours:         # in the Python loader's words
        parse_yaml(text, "p.yaml")
    assert str(ours.value) == f"p.yaml: not valid YAML: {python.value}"


def test_aliases_stay_one_object():
    doc = fast(TRICKY)
    assert doc["copy"] is doc["base"] and doc["same-list"] is doc["list"]
    assert doc["strings-again"] is doc["strings-only"] and doc["seq-again"] is doc["seq-only"]
    loop = fast("a: &a [1, *a]")
    assert loop["a"][1] is loop["a"]


def test_a_value_quoted_and_plain_keeps_its_own_tag():
    assert fast("a: yes\nb: 'yes'\nc: yes\nd: '12'\ne: 12\nf: '12'") == \
        {"a": True, "b": "yes", "c": True, "d": "12", "e": 12, "f": "12"}


def test_a_deployment_shaped_file_reads_the_same():
    users = [{"email": f"user{i}@example.com", "groups": [f"g{i % 7}", "on", "12"]} for i in range(300)]
    devices = [{"name": f"dev{i}", "user": f"user{i % 300}@example.com", "tunnel_ipv4": f"100.96.{i // 250}.{i % 250 + 2}",
                "tunnel_ipv6": f"fd00:5a::{i + 2:x}", **({"enabled": False} if i % 9 == 0 else {})} for i in range(1000)]
    text = yaml.safe_dump({"users": users, "devices": devices}, sort_keys=False)
    assert parse_yaml(text, "i.yaml") == yaml.safe_load(text)
    assert parse_yaml(text, "i.yaml")["users"][0]["groups"] == ["g0", "on", "12"]     # (quoted by the dumper)
    assert parse_yaml(text.replace("'on'", "on"), "i.yaml")["users"][0]["groups"] == ["g0", True, "12"]


scalars = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none(),
                    st.floats(allow_nan=False), st.sampled_from(["yes", "No", "0x1f", "1:30", "~", "2020-02-02", "1e3"]))
docs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=30)


@settings(max_examples=150, deadline=None)
@given(doc=docs, flow=st.sampled_from([None, False, True]))
def test_any_dumped_document_reads_the_same(doc, flow):
    text = yaml.safe_dump({"doc": doc}, default_flow_style=flow, allow_unicode=True)
    assert fast(text) == yaml.safe_load(text)


@pytest.mark.parametrize("bad", ["  - g1\n  -: [x\n", "  - g1\n  - {a: 1\n", "  - g1\n    bad: indent\n"])
def test_an_error_deep_in_a_large_file_is_the_python_parsers_with_its_line(bad):
    text = "users:\n" + "".join(f"- email: user{i}@example.com\n  groups:\n  - g{i}\n" for i in range(2000)) + bad
    with pytest.raises(yaml.YAMLError) as python:
        yaml.safe_load(text)
    with pytest.raises(InputError) as ours:
        parse_yaml(text, "identities.yaml")
    assert str(ours.value) == f"identities.yaml: not valid YAML: {python.value}"
    assert "line 600" in str(ours.value)


# -- control/files.py: the checks' fast paths against the general ones they skip ----------------

def general_unprintable(text):
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cf")), "")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_unprintable_is_the_general_scan(text):
    assert unprintable(text) == general_unprintable(text)


def general_address(where, field, value, version):
    """_address as it was before its shortcut."""
    try:
        addr = ipaddress.ip_address(_string(where, field, value))
    except ValueError:
        raise where.error(field, f"{value!r} is not an IP address") from None
    if addr.version != version:
        raise where.error(field, f"{value!r} is not an IPv{version} address")
    return addr


def outcome(fn, value, version):
    try:
        return fn(_Where("i.yaml", "devices[0] (a)"), "tunnel_ipv4", value, version)
    except InputError as e:
        return str(e)


ADDRESSES = ["100.96.0.2", "fd00:5a::2", "", " 1.2.3.4", "01.2.3.4", "1.2.3", "::ffff:1.2.3.4", "1.2.3.4\x1b",
             "fe80::1%eth0", "256.1.1.1", "FD00:5A::2", "1.2.3.4/32", 5, None, True, "x", "\u200e1.2.3.4"]


@pytest.mark.parametrize("value", ADDRESSES)
@pytest.mark.parametrize("version", [4, 6])
def test_address_is_the_general_parse(value, version):
    assert outcome(_address, value, version) == outcome(general_address, value, version)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.ip_addresses().map(str), st.text(alphabet="0123456789abcdef.:%x", max_size=20)),
       version=st.sampled_from([4, 6]))
def test_address_is_the_general_parse_on_drawn_text(value, version):
    assert outcome(_address, value, version) == outcome(general_address, value, version)


def test_identities_refusals_keep_their_words():
    doc = {"users": [{"email": "a@example.com"}],
           "devices": [{"name": "a", "user": "a@example.com", "tunnel_ipv4": "fd00::1"}]}
    with pytest.raises(InputError, match=r"^i.yaml: devices\[0\] \(a\): tunnel_ipv4: 'fd00::1' is not an IPv4 address$"):
        parse_identities(doc, "i.yaml")
