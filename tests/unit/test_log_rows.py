"""`ztgate logs`' rows (control/cli/watch.py): an allow a learned name decided shows the
hostname after the rule; other events show the rule alone."""
from control.cli.watch import _log_row

EVENT = {"time": "2026-11-30T01:20:00.123456Z", "user": "bob@lab.example", "device": "bob-laptop",
         "src": "100.96.0.3", "dst": "10.20.0.12", "proto": "tcp", "sport": 40000, "dport": 8080,
         "verdict": "allow", "rule": "staff-wiki-by-name", "reason": "rule", "bytes": 60}


def test_an_allow_by_a_learned_name_names_it_after_the_rule():
    row = _log_row(dict(EVENT, hostname="wiki.lab.example"))
    assert (row["rule"], row["to"]) == ("staff-wiki-by-name (wiki.lab.example)", "10.20.0.12:8080")


def test_without_a_hostname_the_rule_alone():
    assert _log_row(EVENT)["rule"] == "staff-wiki-by-name"
    assert _log_row(dict(EVENT, rule=None, verdict="block", reason="default"))["rule"] is None
