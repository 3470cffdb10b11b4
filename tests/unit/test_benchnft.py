"""The bench's nftables ruleset loaded piece by piece (scripts/benchnft.py increments(), which
scripts/benchnftchanges.py loads while its time budget lasts) is the ruleset of ruleset():
the same sets with the same elements, the same rules in the same order."""
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import benchgen  # noqa: E402
import benchnft  # noqa: E402


def _sets(text: str) -> dict[str, str]:
    """set name -> its body (type, comment, elements), from either form."""
    return {m[0]: " ".join(m[1].split()) for m in re.findall(r"set (?:inet \w+ )?(\w+) \{\n(.*?)\n\s*\}", text, re.S)}


def test_the_pieces_make_the_same_ruleset():
    dep = benchgen.build("small", random.Random("benchnft"))
    whole = benchnft.ruleset(dep.policy, dep.identities)
    pieces = list(benchnft.increments(dep.policy, dep.identities))
    assert len(pieces) == 1 + len(dep.policy.rules)
    joined = "".join(pieces)
    assert _sets(joined) == _sets(whole) and len(_sets(whole)) > 2
    chain = whole[whole.index("\tchain forward {"):]
    rules = [line.strip() for line in chain.splitlines()[5:] if line.startswith("\t\t")]
    assert rules and [r.removeprefix("add rule inet ztbench forward ") for r in joined.splitlines()
                      if r.startswith("add rule ")] == rules
    assert chain.splitlines()[:5] == pieces[0][pieces[0].index("\tchain forward {"):].splitlines()[:5]
