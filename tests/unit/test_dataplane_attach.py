"""`ztgate dataplane attach` refuses bad input before anything changes, with `policy apply`'s
messages and exit status 2: unreadable or invalid files, an interface that is not there, a mode
that does not exist. (Refusals that need the kernel: tests/net/test_dataplane_attach.py.)"""
import pytest

from control.cli import main
from control.errors import InputError
from control.files import parse_identities, parse_policy
from control.yamlfile import parse_yaml
from tests.examples import LAB

GOOD_POLICY, GOOD_IDS = str(LAB / "policy.yaml"), str(LAB / "identities.yaml")


def run(capsys, *args):
    code = main(["dataplane", *map(str, args)])
    return code, capsys.readouterr().err


def apply_message(parse, text: str, name: str) -> str:
    """What `policy apply` says of this file (the gateway parses the text it was sent so)."""
    with pytest.raises(InputError) as e:
        parse(parse_yaml(text, name), name)
    return f"ztgate: {e.value}\n"


@pytest.mark.parametrize("text", ["rules: [{name: x}]\n", "version: 2\n", "rules: [\n", "nonsense: 1\n",
                                  "rules: [{name: a, precedence: 1, action: allow, principals: [team:x]}]\n"])
def test_bad_policy_is_refused_as_policy_apply_refuses_it(tmp_path, capsys, text):
    bad = tmp_path / "policy.yaml"
    bad.write_text(text)
    code, err = run(capsys, "attach", "lo", "--policy", bad, "--identities", GOOD_IDS)
    assert code == 2
    assert err == apply_message(parse_policy, text, str(bad))


def test_bad_identities_are_refused_as_policy_apply_refuses_them(tmp_path, capsys):
    text = "users: [{email: a@example.com}]\ndevices: [{name: d, user: b@example.com, tunnel_ipv4: 100.96.0.2}]\n"
    bad = tmp_path / "identities.yaml"
    bad.write_text(text)
    code, err = run(capsys, "attach", "lo", "--policy", GOOD_POLICY, "--identities", bad)
    assert code == 2
    assert err == apply_message(parse_identities, text, str(bad))


def test_unreadable_file_says_what_policy_apply_says(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, err = run(capsys, "attach", "lo", "--policy", missing, "--identities", GOOD_IDS)
    assert code == 2
    assert main(["policy", "apply", str(missing)]) == 2
    assert err == capsys.readouterr().err
    assert "cannot read" in err


def test_missing_interface(capsys):
    code, err = run(capsys, "attach", "ztnosuch0", "--policy", GOOD_POLICY, "--identities", GOOD_IDS)
    assert code == 2
    assert err == "ztgate: no interface ztnosuch0 in this network namespace (see `ip link`)\n"


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dataplane", "attach", "lo", "--policy", GOOD_POLICY, "--identities", GOOD_IDS, "--mode", "offload"])
    assert e.value.code == 2
    assert "invalid choice: 'offload'" in capsys.readouterr().err
