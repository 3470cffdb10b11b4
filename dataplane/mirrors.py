"""Every Python copy of a constant or struct layout that ebpf/ defines: the one place to change
when the C changes. tests/kernel/test_mirrors.py compiles each against the C (values, sizes,
field offsets) and fails naming the one that differs. The verdicts and reasons are in
dataplane/reasons.py, checked the same way. Capacities Python chooses and passes to the C as
-D flags are not here: they are dataplane/layout.py's."""
from __future__ import annotations

import struct

import numpy as np


class Packed(struct.Struct):
    """A little-endian struct.Struct whose fields have names (and so offsets a test can check)."""

    def __init__(self, fields: tuple[tuple[str, str], ...]):
        super().__init__("<" + "".join(code for _, code in fields))
        self.fields = fields


# ---------------------------------------------------------------------------------------------
# The policy's tables (ebpf/maps.h)

NODE_FLAG = 1 << 31          # ZT_NODE_FLAG: a trie slot that points to a child node; else a class id
V4_TOP, V6_TOP = 0, 256      # ZT_V4_TOP, ZT_V6_TOP: the 16-bit first stride: nodes[V4_TOP + byte0].slot[byte1]
FIRST_CHILD_NODE = 512       # past both first strides (V6_TOP + 256): where child nodes start
PORT_END = 0x10000           # port-table padding (struct zt_ports lo[]): above every port

SRC = np.dtype([("ident", "<u4"), ("device", "<u4")])                                     # struct zt_src
IDENT_EXPIRED = 0xFFFFFFFF    # ZT_IDENT_EXPIRED: a source entry's ident for a device whose session is over
SRC_KEY = Packed((("family", "I"), ("addr", "16s")))                                      # struct zt_src_key
SRC_KEY_BANK = 16            # ZT_SRC_KEY_BANK: zt_src_key.family carries the bank from this bit up
BANKS = 2                    # ZT_BANKS: every policy map holds two banks (zt_bank says which decides)
BANK = np.dtype([("bank", "<u4"), ("build", "<u4")])                                       # struct zt_bank
CAND = np.dtype([("rule", "<u2"), ("who", "<u2"), ("sport", "<u2"), ("action", "u1"), ("name", "u1")])  # zt_cand
# Chains (ebpf/maps.h): a service's last entry that says "go on in service N" of its bank
CAND_CHAIN = 0xFF            # ZT_CAND_CHAIN: zt_cand.action of a chain entry (N: rule | sport << 16)
WHO_NEVER = 0xFFFF           # ZT_WHO_NEVER: a chain entry's who-token, never given (the walk skips it)
WALK_CANDS = 64              # ZT_WALK_CANDS: candidates a walk checks in all, over a chain's services
CLASS = np.dtype([("ports", "<u4", (2,)), ("svc_icmp", "<u4"), ("svc_other", "<u4")])   # zt_class; ports: tcp, udp
COUNTER = np.dtype([("packets", "<u8"), ("bytes", "<u8")])                                # struct zt_counter
# Hostnames: zt_learned is keyed like zt_src_hash (SRC_KEY); its value, struct zt_names, is
# Layout.name_words words of name bits (one when 0), little-endian, bit t: name token t
NAME_WORD_BYTES = 8          # sizeof(struct zt_names' w[0])
LEARNED_FILTER_BITS = 16     # ZT_LEARNED_FILTER_BITS: zt_learned_filter has 2^16 slots
LEARNED_FILTER_MUL = 0x9E3779B1   # ZT_LEARNED_FILTER_MUL: the slot is the top bits of (xor of words) * this
LEARNED_FILTER_COUNT_BYTES = 8   # zt_learned_count: a zt_learned_filter slot's refs, one per bank (its first 8 bytes)
LEARNED_MANY = 0xFFFFFFFF    # ZT_LEARNED_MANY: a ref saying more than one address falls in the slot
LEARNED_ONE_NAMES = 24       # struct zt_learned_one: family, addr[4], pad, then the name bits (after the refs)

# ---------------------------------------------------------------------------------------------
# Test runs, conntrack, the flow cache and the epoch (ebpf/maps.h)

DRY_RUN_MAGIC = 0x5A544452   # ZT_DRY_RUN_MAGIC: a test run's metadata asking to decide only
CT_OPEN, CT_CLOSING, CT_KILLED = 0, 1, 2   # enum zt_ct_state: ZT_CT_OPEN, ZT_CT_CLOSING, ZT_CT_KILLED
KILL_BITS = 16               # ZT_KILL_BITS: the epoch's low bits count kills, the bits above the policy
KILL_ENTRIES = 65536         # ZT_KILL_ENTRIES: kills that hold at once (zt_killed); `flows kill --help` says it

CT_KEY = np.dtype([("src", "V16"), ("dst", "V16"), ("sport", "<u2"), ("dport", "<u2"), ("family", "u1"),
                   ("proto", "u1"), ("pad", "<u2")])                                       # struct zt_ct_key
FSLOT = np.dtype([("key", CT_KEY), ("epoch", "<u8"), ("checked_ns", "<u8"), ("until_ns", "<u8"),
                  ("build", "<u4"), ("rule", "<u4"), ("device", "<u4"), ("ident", "<u4"), ("packets", "<u8"),
                  ("bytes", "<u8")])                                                       # struct zt_fslot

# ---------------------------------------------------------------------------------------------
# Flow events (ebpf/maps.h struct zt_event): host byte order, ports too

EVENT = Packed((("time_ns", "Q"), ("build", "I"), ("device", "I"), ("ident", "I"), ("rule", "I"), ("len", "I"),
                ("sport", "H"), ("dport", "H"), ("src", "16s"), ("dst", "16s"), ("family", "B"), ("proto", "B"),
                ("verdict", "B"), ("reason", "B"), ("name", "B"), ("pad", "3s")))
