"""No invalid escape sequence (a DeprecationWarning, a SyntaxError in later Pythons) in this
project's Python sources. pyproject.toml ignores the warning from nameless parses (Hypothesis
reading Debian's bcc as local code): this keeps the project's own files checked by name."""
import subprocess
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def _python_sources() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    paths = [REPO / p for p in tracked if (REPO / p).is_file()]
    return [p for p in paths if p.suffix == ".py" or (not p.suffix and p.read_bytes()[:40].startswith(b"#!")
                                                      and b"python" in p.read_bytes()[:40])]


def test_no_invalid_escape_sequences():
    sources = _python_sources() or [p for p in REPO.rglob("*.py") if ".venv" not in p.parts]   # not a git checkout
    assert sources
    bad = []
    for path in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            except SyntaxError as e:
                bad.append(f"{path.relative_to(REPO)}:{e.lineno}: {e.msg}")
    assert not bad, "\n".join(bad)
