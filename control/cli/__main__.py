"""`python -m control.cli`: the ztgate command."""
import sys

from . import main

sys.exit(main())
