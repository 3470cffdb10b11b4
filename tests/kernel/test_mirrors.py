"""Every Python copy of ebpf/'s C agrees with the C: dataplane/mirrors.py (each value, each
struct's size, each field's offset and size), dataplane/reasons.py (each verdict and reason)
and the C's defaults for dataplane/layout.py's capacities (each -D flag a default Layout
passes). The checks are _Static_assert lines compiled by bcc after the program's own source,
so a definition is found wherever in ebpf/ it lives, with the sizes of the BPF target, and
the compiler names every mismatch."""
import re

import numpy as np
import pytest

from dataplane import mirrors
from dataplane.layout import Layout
from dataplane.reasons import Reason, Verdict

# mirrors.py's constants: a C condition on the Python value {v}
CONSTANTS = {
    "NODE_FLAG": "ZT_NODE_FLAG == {v}",
    "V4_TOP": "ZT_V4_TOP == {v}",
    "V6_TOP": "ZT_V6_TOP == {v}",
    "FIRST_CHILD_NODE": "ZT_V6_TOP + 256 == {v} && ZT_V4_TOP + 256 <= ZT_V6_TOP",   # past both first strides
    # the port search relies on padding above every port, in the type of struct zt_ports' lo[]
    "PORT_END": "{v} > 0xffff && (__typeof__(((struct zt_ports *)0)->lo[0]))({v}) == {v}",
    "DRY_RUN_MAGIC": "ZT_DRY_RUN_MAGIC == {v}",
    "CT_OPEN": "ZT_CT_OPEN == {v}",
    "CT_CLOSING": "ZT_CT_CLOSING == {v}",
    "CT_KILLED": "ZT_CT_KILLED == {v}",
    "KILL_BITS": "ZT_KILL_BITS == {v}",
    "KILL_ENTRIES": "ZT_KILL_ENTRIES == {v}",
    # no identity class can have the id that means session-expired
    "IDENT_EXPIRED": "ZT_IDENT_EXPIRED == {v} && ZT_MAX_IDENTS <= {v}",
    "SRC_KEY_BANK": "ZT_SRC_KEY_BANK == {v}",
    "BANKS": "ZT_BANKS == {v}",
    "NAME_WORD_BYTES": "sizeof(((struct zt_names *)0)->w[0]) == {v}",
    "LEARNED_FILTER_BITS": "ZT_LEARNED_FILTER_BITS == {v}",
    "LEARNED_FILTER_MUL": "ZT_LEARNED_FILTER_MUL == {v}",
    "LEARNED_FILTER_COUNT_BYTES": "sizeof(zt_learned_count) == {v}",
    "LEARNED_MANY": "ZT_LEARNED_MANY == {v}",
    # a chain entry: its action no verdict, its who-token none the compiler gives (< U16_MAX)
    "CAND_CHAIN": "ZT_CAND_CHAIN == {v} && {v} >= ZT_VERDICT__MAX",
    "WHO_NEVER": "ZT_WHO_NEVER == {v}",
    "WALK_CANDS": "ZT_WALK_CANDS == {v}",
    "LEARNED_ONE_NAMES": "__builtin_offsetof(struct zt_learned_one, names) == {v} && "
                         "__builtin_offsetof(struct zt_learned_slot, copy) == sizeof(zt_learned_count)",
}
# mirrors.py's struct layouts: the C struct each copies
STRUCTS = {
    "SRC": "zt_src",
    "SRC_KEY": "zt_src_key",
    "CAND": "zt_cand",
    "CLASS": "zt_class",
    "COUNTER": "zt_counter",
    "CT_KEY": "zt_ct_key",
    "FSLOT": "zt_fslot",
    "EVENT": "zt_event",
    "BANK": "zt_bank",
}
TAG = "mirror mismatch: "


def fields(mirror) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each field of a numpy dtype or a mirrors.Packed."""
    if isinstance(mirror, np.dtype):
        return [(name, offset, dtype.itemsize) for name, (dtype, offset) in mirror.fields.items()]
    out, offset = [], 0
    for name, code in mirror.fields:
        size = mirror.__class__(((name, code),)).size
        out.append((name, offset, size))
        offset += size
    return out


def size(mirror) -> int:
    return mirror.itemsize if isinstance(mirror, np.dtype) else mirror.size


def checks() -> list[tuple[str, str]]:
    """(C condition, what it checks) for every mirror."""
    out = []
    for name, condition in CONSTANTS.items():
        value = getattr(mirrors, name)
        out.append((condition.format(v=f"{value}ULL"), f"dataplane.mirrors.{name} = {value:#x}"))
    for name, struct in STRUCTS.items():
        mirror = getattr(mirrors, name)
        out.append((f"sizeof(struct {struct}) == {size(mirror)}",
                    f"dataplane.mirrors.{name}: sizeof(struct {struct}) is not {size(mirror)}"))
        for field, offset, nbytes in fields(mirror):
            out.append((f"__builtin_offsetof(struct {struct}, {field}) == {offset}",
                        f"dataplane.mirrors.{name}: struct {struct}'s {field} is not at offset {offset}"))
            out.append((f"sizeof(((struct {struct} *)0)->{field}) == {nbytes}",
                        f"dataplane.mirrors.{name}: struct {struct}'s {field} is not {nbytes} bytes"))
    for enum, prefix in ((Verdict, "ZT_VERDICT_"), (Reason, "ZT_REASON_")):
        for member in enum:
            out.append((f"{prefix}{member.name} == {member.value}",
                        f"dataplane.reasons.{enum.__name__}.{member.name} = {member.value}"))
    for flag in Layout().defines():
        define, value = re.fullmatch(r"-D(\w+)=(.+)", flag).groups()
        out.append((f"{define} == {value}", f"dataplane.layout.Layout's default {define}={value} is not the C's"))
    return out


def test_every_mirror_is_checked():
    public = {n for n in vars(mirrors) if n.isupper() and not n.startswith("_")}
    assert public == set(CONSTANTS) | set(STRUCTS)


def test_the_event_record_keeps_its_size():
    """struct zt_event is the record of the ring buffer that every build of a gateway shares
    (pinned): a reader of one build reads another's records, so fields go into its trailing
    pad (the name token took a byte of it) and the record stays 72 bytes. The C's size and
    every field's offset are checked against this mirror below."""
    assert mirrors.EVENT.size == 72
    assert [(f, o, n) for f, o, n in fields(mirrors.EVENT)][-2:] == [("name", 68, 1), ("pad", 69, 3)]


def test_the_mirrors_agree_with_the_c(capfd):
    from bcc import BPF

    from dataplane.program import ztgate_source

    lines = [f'_Static_assert({condition}, "{TAG}{what}");' for condition, what in checks()]
    text = ztgate_source() + '#line 1 "mirror-checks"\n' + "\n".join(lines) + "\n"
    try:
        BPF(text=text, cflags=["-Wno-unused-function"]).cleanup()
        return
    except Exception:     # bcc: "Failed to compile BPF module"; clang wrote why to stderr
        err = capfd.readouterr().err
    mismatches = dict.fromkeys(re.findall(re.escape(TAG) + r'([^"\n]*)', err))    # (once each, in order)
    pytest.fail("\n".join(mismatches) if mismatches else f"the checks do not compile:\n{err[-3000:]}")
