"""``python -m gradclip bench|plot|info``: see :mod:`gradclip.bench.cli`."""

import sys

from gradclip.bench.cli import module_main

if __name__ == "__main__":
    sys.exit(module_main())
