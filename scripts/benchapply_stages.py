"""The controller's side of `policy apply` stage by stage, in this process, with the code of
the checkout it runs from (scripts/benchapply.py --stages runs it once per tree: main's and
this one's, for a before/after in the same run). Prints one JSON line of CPU seconds.

usage: python benchapply_stages.py POLICY.yaml IDENTITIES.yaml   (cwd: the checkout to time)
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())

from control.files import parse_identities, parse_policy  # noqa: E402
from control.gateway.diff import identities_diff, policy_diff  # noqa: E402
from control.model import Identities, Policy  # noqa: E402
from control.store import Store  # noqa: E402
from control.yamlfile import parse_yaml  # noqa: E402


def main() -> None:
    policy_path, identities_path = sys.argv[1:3]
    out, docs = {}, {}

    def stage(name, fn):
        started = time.process_time()
        result = fn()
        out[name] = round(time.process_time() - started, 2)
        return result

    texts = {p: open(p).read() for p in (policy_path, identities_path)}
    docs["policy"] = stage("policy yaml", lambda: parse_yaml(texts[policy_path], policy_path))
    docs["identities"] = stage("identities yaml", lambda: parse_yaml(texts[identities_path], identities_path))
    policy = stage("policy checks", lambda: parse_policy(docs["policy"], policy_path))
    identities = stage("identities checks", lambda: parse_identities(docs["identities"], identities_path))
    stage("diff", lambda: (policy_diff(Policy("block", (), {}), policy), identities_diff(Identities((), ()), identities)))
    store = Store(os.path.join(tempfile.mkdtemp(prefix="ztbench-store-"), "state.db"))

    def write():
        with store.change(0, "policy apply") as tx:
            tx.replace_policy(policy)
            tx.replace_identities(identities)
    stage("store", write)
    out["total"] = round(sum(out.values()), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
