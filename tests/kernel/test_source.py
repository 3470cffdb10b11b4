"""The gateway compiles ebpf/ztgate.c on every full build, for its whole life: it must compile
the source it started with, not a tree someone is editing while it runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BUILD_EDIT_BUILD = """
import pathlib, sys
from dataplane.program import Program
from tests.programs import TEST_LAYOUT
Program(TEST_LAYOUT).close()
(pathlib.Path(sys.argv[1]) / "maps.h").write_text("#error maps.h edited while running\\n")
Program(TEST_LAYOUT).close()
print("built twice")
"""

BUILD = """
from dataplane.program import Program
from tests.programs import TEST_LAYOUT
Program(TEST_LAYOUT).close()
"""


def test_a_build_compiles_the_source_read_at_the_first_build(tmp_path):
    src = tmp_path / "ebpf"
    shutil.copytree(REPO / "ebpf", src)
    env = dict(os.environ, ZTGATE_EBPF_DIR=str(src))
    r = subprocess.run([sys.executable, "-c", BUILD_EDIT_BUILD, str(src)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "built twice" in r.stdout, r.stderr[-2000:]
    # A new process reads the edit; the compiler names the header and line, the sources being
    # written into one text.
    r = subprocess.run([sys.executable, "-c", BUILD], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "maps.h:1" in r.stderr and "edited while running" in r.stderr, r.stderr[-2000:]
