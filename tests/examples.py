"""The example files the repository ships, as tests read them: examples/lab holds the lab's
policy, identities and a packets file for `ztgate explain`."""
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "examples" / "lab"
