"""The numbers ebpf/maps.h #defines, read from the header itself: a test compares what it sees
with the C program's own limits, never with a copy."""
import re
from pathlib import Path

MAPS_H = Path(__file__).resolve().parent.parent / "ebpf" / "maps.h"


def define(name: str) -> int:
    """A numeric #define of ebpf/maps.h (the limiter's constants)."""
    m = re.search(rf"#define {name} (\d+)", MAPS_H.read_text())
    assert m, name
    return int(m.group(1))
