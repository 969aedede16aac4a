"""The benchmark of fleet's overhead: the same as `fleet bench` (fleet/bench.py
says what it measures), with the same options.

Usage: .venv/bin/python benchmarks/roundtrip.py [--tasks N] [--only PART | --skip PART]... [--json]
"""

import sys

from fleet.cli.main import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
