"""The gateway: the store, the kernel build and the WireGuard interfaces, moved together.

core.py holds what every change shares (the lock, the in-memory state, the transaction that
runs a change's Plan, start, rebuild, fail closed); each operation family lives beside it
and only validates a request and states its Plan:

  rules.py        policy apply and the rule verbs (diff.py: what policy apply prints)
  identities.py   users, groups, devices and their pool addresses
  sessions.py     users and devices from the identity provider: login, renewal, expiry, SCIM
                  (expiry.py: the clock that ends sessions at their time)
  connectors.py   connectors and the routes of private prefixes to them
  flows.py        conntrack's flows: list and kill
  hostnames.py    names learned from DNS answers: into the kernel, and out at expiry
  views.py        status, the lists, policy/identities show, audit, trace
  slowpath.py     the DNS slow path's start and stop, `ztgate dns list`
  steps.py        the WireGuard and route steps a Plan stages
  faults.py       fault injection for the tests (ZTGATE_FAULT, ZTGATE_PAUSE_AT)

Every method the socket serves (control/server.py's OPS) is a method of Gateway.
"""
from __future__ import annotations

from .connectors import ConnectorOps
from .core import ONLINE_SECONDS
from .flows import FlowOps
from .hostnames import HostnameOps
from .identities import IdentityOps
from .rules import RuleOps
from .sessions import SessionOps, SessionRefused
from .slowpath import SlowPathOps     # the DNS slow path (control/dns)
from .views import Views

__all__ = ["Gateway", "ONLINE_SECONDS", "SessionRefused"]


class Gateway(RuleOps, SessionOps, IdentityOps, ConnectorOps, FlowOps, Views, HostnameOps, SlowPathOps):
    """One gateway: Core's state and transaction, with every operation family's methods."""
