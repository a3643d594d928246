"""Core benchmarks (SPEC section 6): ``python benchmarks/bench_core.py [step|sequence|all]``.

Benchmark 1 (``step``): policy steps/s in step mode; benchmark 2 (``sequence``): recurrent-mode
training samples/s. Both print a table and write JSON to ``bench_results/<name>.json``; the
code lives in :mod:`mop_torchrl.bench` so that the package CLI can run it too.
"""

import sys

from mop_torchrl.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
