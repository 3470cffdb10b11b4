"""ebpf/reasons.h and dataplane/reasons.py define the same verdicts and reasons, same numbers."""
import re
from pathlib import Path

import pytest

from dataplane.reasons import Reason, Verdict

HEADER = Path(__file__).resolve().parents[2] / "ebpf" / "reasons.h"


def c_enum(name: str) -> dict[str, int]:
    """The members of `enum name { ... }` with their values (implicit ones counted as C does)."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", HEADER.read_text(), flags=re.S)
    body = re.search(rf"enum\s+{name}\s*\{{(.*?)\}}", text, re.S)
    assert body, f"enum {name} not found in {HEADER}"
    members, value = {}, -1
    for item in filter(None, (i.strip() for i in body.group(1).split(","))):
        m = re.fullmatch(r"(\w+)(?:\s*=\s*(\d+))?", item)
        assert m, f"cannot read enum item {item!r}"
        value = int(m.group(2)) if m.group(2) else value + 1
        members[m.group(1)] = value
    return members


@pytest.mark.parametrize("enum, prefix, py", [("zt_verdict", "ZT_VERDICT_", Verdict), ("zt_reason", "ZT_REASON_", Reason)])
def test_c_and_python_enums_agree(enum, prefix, py):
    c = c_enum(enum)
    assert all(k.startswith(prefix) for k in c), c
    c = {k[len(prefix):]: v for k, v in c.items() if not k.endswith("__MAX")}
    assert c == {m.name: m.value for m in py}
    assert c_enum(enum)[prefix + "_MAX"] == max(c.values()) + 1
