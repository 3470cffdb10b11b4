"""Prometheus metrics, read from the kernel's counters at each scrape (prometheus_client).

Nothing is counted twice in userspace: the kernel counts packets and bytes per rule and per
reason, and events it did not emit; this collector only names them.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from dataplane.reasons import Reason

from .gateway import ONLINE_SECONDS
from .kernel import DEFAULT_RULE


class GatewayCollector:
    def __init__(self, gateway, flowlog=None):
        self.gateway, self.flowlog = gateway, flowlog

    def collect(self):
        gw = self.gateway
        with gw.lock:
            build = gw.kernel.build
            rules = {r.name: r.action for r in gw.policy.rules}
            default = gw.policy.default_action
            hits = gw.kernel.rule_hits()
            reasons = gw.kernel.reason_counters()
            lost = gw.kernel.events_lost()
            occupancy = gw.kernel.occupancy()
            generation = gw.store.generation()
            peers = gw.peer_states()
            devices = gw.identities.devices

        packets = CounterMetricFamily("ztgate_rule_packets", "Packets decided by each rule",
                                      labels=["rule", "verdict"])
        nbytes = CounterMetricFamily("ztgate_rule_bytes", "Bytes decided by each rule", labels=["rule", "verdict"])
        for name, (p, b) in sorted(hits.items()):
            verdict = rules.get(name, default if name == DEFAULT_RULE else "removed")
            packets.add_metric([name, verdict], p)
            nbytes.add_metric([name, verdict], b)
        yield packets
        yield nbytes

        by_reason = CounterMetricFamily("ztgate_packets", "Every packet, by reason (rule and default: "
                                        "see ztgate_rule_packets for allow/block)", labels=["reason"])
        by_reason_bytes = CounterMetricFamily("ztgate_bytes", "Every byte, by reason", labels=["reason"])
        drops = CounterMetricFamily("ztgate_drops", "Packets dropped before any rule is consulted, by reason",
                                    labels=["reason"])
        for reason in Reason:
            p, b = reasons.get(reason, (0, 0))
            by_reason.add_metric([reason.label], p)
            by_reason_bytes.add_metric([reason.label], b)
            if reason not in (Reason.RULE, Reason.DEFAULT, Reason.NOT_IP, Reason.REPLY):
                drops.add_metric([reason.label], p)
        yield by_reason
        yield by_reason_bytes
        yield drops

        yield CounterMetricFamily("ztgate_events_lost", "Flow events the kernel did not emit (rate limit or "
                                  "ring buffer full)", value=lost)
        if self.flowlog is not None:
            yield CounterMetricFamily("ztgate_events_written", "Flow events written to the flow log",
                                      value=self.flowlog.written)
        used = GaugeMetricFamily("ztgate_map_entries", "Entries in use per kernel table", labels=["map"])
        cap = GaugeMetricFamily("ztgate_map_capacity", "Entries each kernel table holds", labels=["map"])
        for name, (n, size) in sorted(occupancy.items()):
            used.add_metric([name], n)
            cap.add_metric([name], size)
        yield used
        yield cap
        yield GaugeMetricFamily("ztgate_policy_generation", "Generation of the policy in force", value=generation)
        yield GaugeMetricFamily("ztgate_build", "Kernel build in force", value=build.number if build else 0)
        now = time.time()
        online = sum(1 for d in devices if d.enabled and d.public_key in peers
                     and peers[d.public_key].last_handshake and now - peers[d.public_key].last_handshake < ONLINE_SECONDS)
        yield GaugeMetricFamily("ztgate_devices_online", f"Devices with a handshake in the last {ONLINE_SECONDS} s",
                                value=online)
        enrolled = GaugeMetricFamily("ztgate_devices", "Enrolled devices", labels=["state"])
        enrolled.add_metric(["enabled"], sum(d.enabled for d in devices))
        enrolled.add_metric(["disabled"], sum(not d.enabled for d in devices))
        yield enrolled

        connectors = gw.connector_list()
        up = GaugeMetricFamily("ztgate_connector_online", f"1 if the connector's last handshake is younger than "
                               f"{ONLINE_SECONDS} s", labels=["connector"])
        traffic = CounterMetricFamily("ztgate_connector_bytes", "Bytes through each connector's tunnel",
                                      labels=["connector", "direction"])
        for c in connectors:
            up.add_metric([c["name"]], int(c["online"]))
            traffic.add_metric([c["name"], "in"], c["rx_bytes"])
            traffic.add_metric([c["name"], "out"], c["tx_bytes"])
        yield up
        yield traffic

        yield from dns_metrics(gw)          # the DNS slow path (control/dns)


def dns_metrics(gw):
    """The DNS slow path's own counters, kept in userspace where it runs (control/dns)."""
    sp = getattr(gw, "slowpath", None)
    if sp is not None:
        c = SimpleNamespace(**sp.counters.copy())      # one consistent copy, under the counters' lock
        yield GaugeMetricFamily("ztgate_dns_up", "1 while the DNS slow path reads its queue", value=1)
        answers = CounterMetricFamily("ztgate_dns_answers", "Resolvers' answers through the slow path",
                                      labels=["outcome"])
        for outcome, n in (("queued", c.queued), ("learned", c.learned), ("late", c.late),
                           ("refused", sum(c.refused.values()))):
            answers.add_metric([outcome], n)
        yield answers
        refused = CounterMetricFamily("ztgate_dns_refused", "Answers that taught nothing, by why",
                                      labels=["reason"])
        for reason, n in sorted(c.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        pairs = CounterMetricFamily("ztgate_dns_pairs_refused", "(name, address) pairs of answers not learned, by "
                                    "bound: per_name, total, per_device, unnamed (no rule names it), "
                                    "per_answer (beyond 256 pairs an answer)",
                                    labels=["bound"])
        with gw.kernel.learned_lock:
            held_back = sorted(gw.kernel.learned.refused.items())
        for bound, n in held_back + [("per_answer", c.pairs_over_cap)]:
            pairs.add_metric([bound], n)
        yield pairs
        yield CounterMetricFamily("ztgate_dns_questions", "Devices' questions seen", value=c.questions)
        yield GaugeMetricFamily("ztgate_dns_outstanding", "Questions awaiting their answer", value=len(sp.questions))
    elif gw.config.dns.enabled:
        yield GaugeMetricFamily("ztgate_dns_up", "1 while the DNS slow path reads its queue", value=0)


def serve_metrics(address: tuple[str, int], gateway, flowlog=None):
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gateway, flowlog))
    return start_http_server(address[1], addr=address[0], registry=registry)
