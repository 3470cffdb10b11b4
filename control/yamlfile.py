"""YAML in and out, with the errors every reader gives: the file named, what is wrong with it.
Used by every file ztgate reads (policy, identities, gateway and connector configuration) and by
the policy texts `policy apply` sends over the socket."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .errors import InputError
from .gcpause import collections_paused

STR_TAG = "tag:yaml.org,2002:str"

if hasattr(yaml, "CSafeLoader"):
    class FastSafeLoader(yaml.CSafeLoader):
        """libyaml's parser under PyYAML's safe constructor, with shortcuts that give the same
        documents: the tag of a plain scalar is worked out once per text (the keys of 100,000
        devices are the same few words); a string scalar is its text, and a mapping or list
        of strings only is made at once, without the constructor's general dispatch (which a
        device list calls a million times). A quarter off the bench's large identities file
        (CPU 2.9 s instead of 3.9 s; what is left is mostly libyaml composing the nodes)."""

        def __init__(self, stream):
            super().__init__(stream)
            self._tags: dict = {}

        def resolve(self, kind, value, implicit):
            if kind is not ScalarNode or self.yaml_path_resolvers:
                return super().resolve(kind, value, implicit)
            key = (value, implicit)
            tag = self._tags.get(key)
            if tag is None:
                tag = self._tags[key] = super().resolve(kind, value, implicit)
            return tag

        def construct_object(self, node, deep=False):
            kind = type(node)
            if kind is ScalarNode and node.tag == STR_TAG:
                return node.value       # what the safe constructor makes of it (construct_yaml_str)
            if PLAIN.get(node.tag) is kind and node not in self.constructed_objects:
                # A mapping or sequence of strings only (a device; a user's groups): made at once.
                # With no other node inside, there is no merge key and no alias to follow; the
                # object is remembered as the safe constructor remembers it, for aliases to it.
                data = _of_strings(node, kind)
                if data is not None:
                    self.constructed_objects[node] = data
                    return data
            return super().construct_object(node, deep)

    def _of_strings(node, kind):
        """The dict or list a mapping or sequence node of string scalars only stands for (None:
        another node in it)."""
        if kind is MappingNode:
            for key, value in node.value:
                if type(key) is not ScalarNode or key.tag != STR_TAG or type(value) is not ScalarNode \
                        or value.tag != STR_TAG:
                    return None
            return {key.value: value.value for key, value in node.value}
        for item in node.value:
            if type(item) is not ScalarNode or item.tag != STR_TAG:
                return None
        return [item.value for item in node.value]

    PLAIN = {"tag:yaml.org,2002:map": MappingNode, "tag:yaml.org,2002:seq": SequenceNode}   # (tagged as such)

    # ~10 times faster than the Python parser (the bench's large identities file: 76 s there).
    # Its errors are worded otherwise, and it takes tabs where the Python parser refuses them:
    # a text with a tab, and any text it refuses, goes to the Python parser, whose verdict and
    # message stand.
    FAST_LOADER = FastSafeLoader
else:
    FAST_LOADER = None


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
    with collections_paused():
        return _parse(text, name)


def _parse(text: str, name: Any) -> Any:
    if FAST_LOADER is not None and "\t" not in text:
        try:
            return yaml.load(text, Loader=FAST_LOADER)
        except (yaml.YAMLError, ValueError, TypeError):
            pass         # the Python loader decides, and says why in its own words (below)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{name}: not valid YAML: {e}") from None
    except (ValueError, TypeError) as e:   # an explicit tag the value does not fit (`!!int x`)
        raise InputError(f"{name}: not valid YAML: a tagged value cannot be read as its tag says "
                         f"({e}); remove the tag or fix the value") from None


def dump_yaml(doc: dict) -> str:
    """A document as ztgate prints its files (keys in their order, short lists inline)."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
