"""control/yamlfile.py reads with libyaml's parser where it can, and the verdict and the words
of every refusal stay the Python parser's."""
import pytest
import yaml

from control.errors import InputError
from control.yamlfile import FAST_LOADER, parse_yaml

DOC = """
default_action: block
rules:
  - name: web
    precedence: 10
    action: allow
    principals: [group:staff, "user:ann@example.com"]
    destination: {cidrs: [10.20.0.0/16], ports: [80, "8000-8080"]}
    enabled: yes
  - {name: "x: y", precedence: 0x10, action: block, note: ~, when: 2024-01-01, ratio: 1e3}
"""


def test_documents_read_as_the_python_parser_reads_them():
    assert FAST_LOADER is not None      # Debian's python3-yaml has libyaml
    assert parse_yaml(DOC, "p.yaml") == yaml.safe_load(DOC)


@pytest.mark.parametrize("text", ["a: [1, 2", "a: 1\n b: 2", "- a\nb: 1", "k: \t1", "x: !!python/object:os.system x"])
def test_refusals_are_worded_by_the_python_parser(text):
    with pytest.raises(yaml.YAMLError) as python:
        yaml.safe_load(text)
    with pytest.raises(InputError) as ours:
        parse_yaml(text, "p.yaml")
    assert str(ours.value) == f"p.yaml: not valid YAML: {python.value}"


@pytest.mark.parametrize("text", ["version: !!int x\n", "a: !!float zz\n", "a: !!timestamp 2020-13-45\n"])
def test_a_tag_the_value_does_not_fit_is_refused_not_raised(text):
    """PyYAML raises a bare ValueError there; the CLI printed a traceback."""
    with pytest.raises(InputError, match=r"^p\.yaml: not valid YAML: a tagged value cannot be read as its tag says"):
        parse_yaml(text, "p.yaml")
