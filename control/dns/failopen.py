"""Fail-open for the slow path's NFQUEUE: with NFQA_CFG_F_FAIL_OPEN, a packet the kernel
cannot queue (the queue holds `queue_length` packets already, or the reader's socket buffer
is full) is accepted instead of dropped, so a DNS answer passes to its device unlearned
rather than being lost (spec/POLICY.md, "Hostnames"; issue 16). netfilterqueue binds without
it and has no call for it, so the config message is sent here, on the queue's own netlink
socket: the kernel takes an NFQNL_MSG_CONFIG for a queue only from the socket bound to it
(net/netfilter/nfnetlink_queue.c, nfqnl_recv_config: another portid gets EPERM). pyroute2
has no nfnetlink_queue messages; the message is a dozen packed bytes.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time

from ..errors import KernelError

NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG = 3, 2
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQA_CFG_F_FAIL_OPEN = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLMSG, NFGEN = struct.Struct("=IHHII"), struct.Struct("=BBH")
SEQ = 0x7A16                  # ours: the ack is told apart from anything else on the socket by it


def config_message(queue: int, seq: int = SEQ) -> bytes:
    """NFQNL_MSG_CONFIG for QUEUE: flags FAIL_OPEN under mask FAIL_OPEN, with an ack asked."""
    body = NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue))
    for kind in (NFQA_CFG_MASK, NFQA_CFG_FLAGS):        # netlink attributes: u32 in network order
        body += struct.pack("=HH", 8, kind) + struct.pack("!I", NFQA_CFG_F_FAIL_OPEN)
    kind = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
    return NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def set_fail_open(fd: int, queue: int, timeout: float = 2.0) -> None:
    """Turn fail-open on for QUEUE, bound on the netlink socket FD (netfilterqueue's get_fd()),
    before anything is queued to it; KernelError if the kernel refuses or does not answer.
    The duplicate shares the queue's open file, flags included: it is waited on with poll and
    read with MSG_DONTWAIT, never put in non-blocking mode (that would be the queue's too)."""
    sock = socket.socket(fileno=os.dup(fd))      # the same socket (same portid), closed apart
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        sock.sendto(config_message(queue), (0, 0))
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise KernelError(f"NFQUEUE {queue}: no answer to the fail-open request")
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            for kind, seq, error in _messages(data):
                if kind == NLMSG_ERROR and seq == SEQ:
                    if error:
                        raise KernelError(f"NFQUEUE {queue}: the kernel refused fail-open: "
                                          f"{os.strerror(-error) if error < 0 else error}")
                    return
    except OSError as e:
        if e.errno == errno.ENOBUFS:
            raise KernelError(f"NFQUEUE {queue}: fail-open not confirmed (socket overrun)") from None
        raise
    finally:
        sock.close()                              # the duplicate only: the queue keeps its own


def _messages(data: bytes):
    """(type, seq, error) of each netlink message in DATA (error: an NLMSG_ERROR's code, 0 = ack)."""
    at = 0
    while at + NLMSG.size <= len(data):
        length, kind, _, seq, _ = NLMSG.unpack_from(data, at)
        if length < NLMSG.size:
            return
        error = struct.unpack_from("=i", data, at + NLMSG.size)[0] if kind == NLMSG_ERROR else 0
        yield kind, seq, error
        at += (length + 3) & ~3
