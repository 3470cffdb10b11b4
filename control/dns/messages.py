"""DNS questions and answers, read with dnspython, and what an answer teaches.

A device's question counts when it is a standard query (QR 0, opcode QUERY) of exactly one
question of class IN for A or AAAA. An answer teaches only when it answers such a question
that the same device asked the same resolver (questions.py matches them), and is a standard
response (QR 1, opcode QUERY, rcode NOERROR, not truncated) whose one question is the one
asked. Then, as spec/POLICY.md says, every A/AAAA record of the asked type at the end of the
CNAME chain that starts at the question's name teaches its address for every name of the
chain, for the record's TTL (clamped by the caller), up to MAX_TEACHINGS pairs an answer
(the rest are counted and not taught). Records off the chain, of another class
or type, or in other sections teach nothing. Anything dnspython cannot read whole
(compression loops or forward pointers, counts larger than the message, trailing bytes,
bad names) teaches nothing.
"""
from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import dataclass
from typing import Optional

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

ASKED_TYPES = {dns.rdatatype.A: "A", dns.rdatatype.AAAA: "AAAA"}
MAX_CHAIN = 8                 # CNAME hops followed from the question's name
MAX_TEACHINGS = 256           # (name, address) pairs one answer may teach
LABEL = re.compile(r"[a-z0-9-]{1,63}\Z")     # as rules may write them (control/learned.py's hostname_problem)


class Refused(Exception):
    """Why a message teaches nothing (its text is the refusal's label for the counters)."""


@dataclass(frozen=True)
class Question:
    id: int
    name: str                 # lowercase, no trailing dot
    qtype: int


@dataclass(frozen=True)
class Teaching:
    name: str
    address: ipaddress._BaseAddress
    ttl: int


class Taught(list):
    """What an answer teaches, at most MAX_TEACHINGS pairs (record by record, each for every
    name of the chain); .over: how many more it held, not taught."""
    over = 0


def _read(wire: bytes, question_only: bool = False) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire, ignore_trailing=False, question_only=question_only)
    except dns.exception.DNSException as e:
        raise Refused("malformed") from e
    except (ValueError, IndexError, UnicodeError, KeyError) as e:   # hostile bytes: never a crash
        raise Refused("malformed") from e


def name_text(name: dns.name.Name) -> Optional[str]:
    """A name as policy rules write it, or None if no rule could name it (labels of 1-63
    letters, digits and hyphens, as spec/POLICY.md's syntax has them, hyphens first or last
    included: every name a rule may hold can be learned; a `*` label is never learned: an
    answer may not teach a wildcard)."""
    try:
        text = name.to_text(omit_final_dot=True).lower()
    except dns.exception.DNSException:
        return None
    if not text or text == "." or len(text) > 253:
        return None
    return text if all(LABEL.match(label) for label in text.split(".")) else None


def _one_question(msg: dns.message.Message) -> Question:
    if msg.opcode() != dns.opcode.QUERY:
        raise Refused("not-a-query")
    if len(msg.question) != 1:
        raise Refused("question-count")
    q = msg.question[0]
    if q.rdclass != dns.rdataclass.IN:
        raise Refused("wrong-class")
    if q.rdtype not in ASKED_TYPES:
        raise Refused("not-an-address-question")
    name = name_text(q.name)
    if name is None:
        raise Refused("bad-name")
    return Question(msg.id, name, q.rdtype)


def read_question(wire: bytes) -> Question:
    """A device's question, or Refused (what follows the question section is not read)."""
    msg = _read(wire, question_only=True)
    if msg.flags & dns.flags.QR:
        raise Refused("not-a-question")
    return _one_question(msg)


def read_answer(wire: bytes) -> tuple[Question, dns.message.Message]:
    """A resolver's answer and the question it repeats, or Refused."""
    msg = _read(wire)
    if not msg.flags & dns.flags.QR:
        raise Refused("not-an-answer")
    if msg.flags & dns.flags.TC:
        raise Refused("truncated")        # the device asks again over TCP: that answer teaches
    if msg.rcode() != dns.rcode.NOERROR:
        raise Refused("error-rcode")
    return _one_question(msg), msg


def teachings(question: Question, msg: dns.message.Message) -> Taught:
    """What an answer to QUESTION teaches (see the module's doc)."""
    chain = [dns.name.from_text(question.name)]
    for _ in range(MAX_CHAIN):
        cname = msg.get_rrset(msg.answer, chain[-1], dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        if len(cname) != 1:
            raise Refused("cname-set")
        target = cname[0].target
        if target in chain:
            raise Refused("cname-loop")
        chain.append(target)
    else:
        if msg.get_rrset(msg.answer, chain[-1], dns.rdataclass.IN, dns.rdatatype.CNAME) is not None:
            raise Refused("cname-chain-too-long")
    records = msg.get_rrset(msg.answer, chain[-1], dns.rdataclass.IN, question.qtype)
    if records is None:
        return Taught()                 # NODATA: the name has no record of the asked type
    names = [n for n in (name_text(c) for c in chain) if n is not None]
    # the first MAX_TEACHINGS pairs teach; the rest are only counted (never built: an answer
    # may hold thousands of records, times the chain's names)
    pairs = ((rd, n) for rd in records for n in names)
    out = Taught(Teaching(n, ipaddress.ip_address(rd.address), records.ttl)
                 for rd, n in itertools.islice(pairs, MAX_TEACHINGS))
    out.over = max(0, len(records) * len(names) - MAX_TEACHINGS)
    return out
