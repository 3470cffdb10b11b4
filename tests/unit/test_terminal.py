"""What the CLI prints cannot drive the reader's terminal: names that reached the store before
validation refused control characters (or that a later source, an IdP, hands over) print as
escapes, while the CLI's own newlines and tabs stay."""
import io
import subprocess
import sys

from control.cli.output import Printable
from tests.netns import REPO


def test_control_characters_print_as_escapes():
    out = io.StringIO()
    Printable(out).write("eve\x1b]0;owned\x07\u202egpj.exe\x9b2J\tok\n")
    assert out.getvalue() == "eve\\x1b]0;owned\\x07\\u202egpj.exe\\x9b2J\tok\n"


def test_the_cli_prints_through_it(tmp_path):
    """An error that quotes its input raw (a path here) reaches stderr escaped."""
    missing = tmp_path / "policy\x1b[2J.yaml"
    r = subprocess.run([sys.executable, "-m", "control.cli", "policy", "check", "--policy", str(missing),
                        "--identities", str(missing)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "\x1b" not in r.stderr and "policy\\x1b[2J.yaml" in r.stderr, r.stderr
