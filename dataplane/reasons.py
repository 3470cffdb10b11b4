"""Python mirror of ebpf/reasons.h (a test checks they agree). Names are what the CLI prints."""
from enum import IntEnum


class Verdict(IntEnum):
    ALLOW = 0
    BLOCK = 1
    UNKNOWN = 2
    MALFORMED = 3
    FRAGMENT = 4
    PASS = 5

    @property
    def label(self) -> str:
        return self.name.lower()


class Reason(IntEnum):
    RULE = 0
    DEFAULT = 1
    UNKNOWN_SOURCE = 2
    BAD_VERSION = 3
    IPV4_SHORT = 4
    IPV4_BAD_IHL = 5
    IPV4_BAD_LENGTH = 6
    IPV4_TRUNCATED = 7
    IPV4_FRAGMENT = 8
    IPV6_SHORT = 9
    IPV6_BAD_LENGTH = 10
    IPV6_TRUNCATED = 11
    IPV6_EXT_TRUNCATED = 12
    IPV6_EXT_TOO_MANY = 13
    IPV6_FRAGMENT = 14
    TCP_SHORT = 15
    TCP_BAD_OFFSET = 16
    TCP_TRUNCATED = 17
    UDP_SHORT = 18
    ETH_SHORT = 19
    NOT_IP = 20
    INTERNAL = 21
    ETH_VLAN_DEPTH = 22
    REPLY = 23
    NOT_REPLY = 24
    REVOKED = 25
    KILLED = 26
    FRAGMENT_FOLLOWS = 27
    FRAGMENT_OVERLAP = 28
    SESSION_EXPIRED = 29

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> "Reason":
        return cls[label.upper().replace("-", "_")]
