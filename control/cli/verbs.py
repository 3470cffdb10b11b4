"""The shape every verb shares: its help and examples, the policy files it reads, the socket
of the gateway it talks to. control/cli/parser.py and parser_local.py build the verbs with these."""
from __future__ import annotations

import argparse
import textwrap

from ..socket_default import DEFAULT_SOCKET


def epilog(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def verb(parent, name: str, help: str, description: str, examples: str):
    return parent.add_parser(name, help=help, description=description, epilog=epilog(examples),
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def files(sp, packets: bool):
    sp.add_argument("--policy", required=True, metavar="FILE", help="policy.yaml")
    sp.add_argument("--identities", required=True, metavar="FILE", help="identities.yaml")
    if packets:
        sp.add_argument("--packets", metavar="FILE", help="packets, one JSON object a line")


def gw(sp, reads: bool, run) -> None:
    """A verb that talks to the running gateway over its socket."""
    sp.add_argument("--socket", metavar="PATH", help=f"the gateway's socket (default $ZTGATE_SOCKET or {DEFAULT_SOCKET})")
    if reads:
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(run=run)
