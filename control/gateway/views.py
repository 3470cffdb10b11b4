"""The read-only answers: status, the lists (rules, users, groups, devices), the policy and
identities in the file format, the audit, and `ztgate trace`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import routes, wireguard
from ..errors import InputError, ZtError
from ..files import identities_doc, policy_doc, rule_doc
from ..kernel import program_on
from ..model import fold
from ..packets import build_raw, packet_from_fields
from ..reference import identify, trace
from ..yamlfile import dump_yaml
from .core import ONLINE_SECONDS, Core


class Views(Core):
    def status(self) -> dict:
        with self.lock:
            att = self.kernel.attachment()
            build = self.kernel.build
            peers = self.peer_states()
            now = time.time()
            online = sum(1 for p in peers.values() if p.last_handshake and now - p.last_handshake < ONLINE_SECONDS)
            pins = sorted(str(p.relative_to(self.config.bpf_pin_dir))
                          for p in Path(self.config.bpf_pin_dir).rglob("*") if not p.is_dir()) \
                if Path(self.config.bpf_pin_dir).exists() else []
            return {
                "interface": self.config.interface, "wireguard": self.wg_kind, "public_key": self.public_key,
                "listen_port": self.config.listen_port, "endpoint": self.config.endpoint,
                "addresses": [str(a) for a in self.config.gateway_addresses],
                "program_id": att[0] if att else None, "attach_mode": att[1] if att else None,
                "build": build.number if build else None, "pin_dir": str(self.config.bpf_pin_dir), "pinned": pins,
                "generation": self.store.generation(),
                "users": len(self.identities.users), "groups": len(self.store.groups()),
                "devices": len(self.identities.devices),
                "connectors": [{"name": c.name, "interface": c.interface, "routes": [str(r) for r in c.routes],
                                "reply_program": program_on(c.interface)} for c in self.connectors],
                "warnings": routes.host_warnings(tuple(self.config.routes)),
                "devices_enabled": sum(d.enabled for d in self.identities.devices),
                "devices_online": online, "rules": len(self.policy.rules),
                "rules_enabled": len(self.policy.ordered_rules),
                "default_action": self.policy.default_action,
                "uptime_seconds": round(now - self.started, 1),
                "tables": build.tables.stats if build else {},
            }

    def peer_states(self) -> dict:
        """The ingress interface's peers as WireGuard has them, by public key."""
        try:
            return {p.public_key: p for p in wireguard.show(self.config.interface).peers}
        except ZtError:
            return {}

    def policy_show(self) -> dict:
        with self.lock:
            return {"generation": self.store.generation(), "policy": dump_yaml(policy_doc(self.policy))}

    def identities_show(self) -> dict:
        with self.lock:
            return {"generation": self.store.generation(), "identities": dump_yaml(identities_doc(self.identities))}

    def rule_list(self) -> list[dict]:
        with self.lock:
            hits = self.kernel.rule_hits()
            out = []
            for r in sorted(self.policy.rules, key=lambda r: r.precedence):
                packets, nbytes = hits.get(r.name, (0, 0))
                out.append(dict(rule_doc(r), enabled=r.enabled, packets=packets, bytes=nbytes))
            return out

    def user_list(self) -> list[dict]:
        with self.lock:
            count: dict[str, int] = {}
            for d in self.identities.devices:
                count[d.user] = count.get(d.user, 0) + 1
            return [{"email": u.email, "groups": sorted(self.policy.groups_of(u)), "devices": count.get(u.key, 0),
                     "active": u.active}
                    for u in self.identities.users]

    def group_list(self) -> list[dict]:
        with self.lock:
            out = [{"name": g, "source": "gateway", "members": m} for g, m in self.store.groups().items()]
            out += [{"name": g, "source": "policy", "members": list(m)} for g, m in self.policy.groups.items()]
            return sorted(out, key=lambda g: (g["name"], g["source"]))

    def device_list(self) -> list[dict]:
        with self.lock:
            peers = self.peer_states()
            created = self.store.created()
            out = []
            for d in self.identities.devices:
                p = peers.get(d.public_key) if d.public_key else None
                out.append({
                    "name": d.name, "user": d.user, "enabled": d.enabled,
                    "addresses": [str(a) for a in d.addresses], "public_key": d.public_key,
                    "created": created.get(d.name), "endpoint": p.endpoint if p else None,
                    "last_handshake": p.last_handshake if p and p.last_handshake else None,
                    "rx_bytes": p.rx_bytes if p else 0, "tx_bytes": p.tx_bytes if p else 0,
                    "session_expires": d.session_expires,
                })
            return out

    def audit(self, limit: int) -> list[dict]:
        with self.lock:
            return self.store.audit(limit)

    def trace(self, packet: dict) -> dict:
        """One packet through the attached program (BPF_PROG_TEST_RUN) and the reference:
        the kernel's own verdict and rule, and why every rule before it did not match."""
        with self.lock:
            fields = dict(packet)
            user = fields.pop("user", None)
            if user is not None:
                fields["src"] = self._source_of(user, fields.get("dst"))
            pkt = packet_from_fields(fields, "trace")
            learned = {pkt.dst: self.kernel.learned_names(pkt.dst)}
            decision, misses = trace(self.policy, self.identities, pkt, learned)
            r, rule = self.kernel.trace(build_raw(pkt))
            hostname = self.kernel.hostname(r.name, pkt.dst)
            who = identify(self.policy, self.identities, pkt.src)
            return {
                "packet": {"src": str(pkt.src), "dst": str(pkt.dst), "proto": pkt.protocol_name,
                           "proto_number": pkt.proto, "sport": pkt.sport, "dport": pkt.dport},
                "identity": {"device": who.device.name, "user": who.email, "groups": sorted(who.groups)} if who else None,
                "kernel": {"verdict": r.verdict.label, "reason": r.reason.label, "rule": rule,
                           "build": self.kernel.build.number, **({"hostname": hostname} if hostname else {})},
                "reference": decision.as_json(),
                "tried": [{"rule": rl.name, "precedence": rl.precedence, "action": rl.action, "why_not": why}
                          for rl, why in misses],
            }

    def _source_of(self, email: Any, dst: Any) -> str:
        if not isinstance(email, str):
            raise InputError("trace: user must be an email")
        version = 6 if isinstance(dst, str) and ":" in dst else 4
        for d in self.identities.devices:
            if d.user == fold(email) and d.enabled:
                for a in d.addresses:
                    if a.version == version:
                        return str(a)
        raise InputError(f"trace: {email} has no enabled device with an IPv{version} tunnel address")
