"""``python -m benchmarks ...`` == ``attnzoo bench ...``."""

import sys

from benchmarks.runner import main

if __name__ == "__main__":
    sys.exit(main())
