"""``python -m meshward.proxy``: the same as ``meshward proxy``."""

import sys

from meshward.proxy import run

sys.exit(run.main(sys.argv[1:]))
