"""YAML in and out, with the errors every reader gives: the file named, what is wrong with it.
Used by every file ztgate reads (policy, identities, gateway and connector configuration) and by
the policy texts `policy apply` sends over the socket."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

# libyaml's parser under PyYAML's safe constructor: the same documents, ~10 times faster (the
# bench's large identities file: 76 s in the Python parser). Its errors are worded otherwise,
# and it takes tabs where the Python parser refuses them: a text with a tab, and any text it
# refuses, goes to the Python parser, whose verdict and message stand.
FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def read_yaml(path: str | Path) -> Any:
    """The document in the file at PATH (None if it is empty)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    return parse_yaml(text, path)


def parse_yaml(text: Any, name: Any) -> Any:
    """The document in TEXT, which came from the file NAME."""
    if not isinstance(text, str):
        raise InputError(f"{name}: the file's text must be a string")
    if FAST_LOADER is not None and "\t" not in text:
        try:
            return yaml.load(text, Loader=FAST_LOADER)
        except yaml.YAMLError:
            pass         # the Python loader decides, and says why in its own words (below)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{name}: not valid YAML: {e}") from None


def dump_yaml(doc: dict) -> str:
    """A document as ztgate prints its files (keys in their order, short lists inline)."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
