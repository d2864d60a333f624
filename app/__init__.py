"""ripelm: a local, private LLM assistant for the terminal."""

import os
import sys

__version__ = "0.1.0"

# torch's OpenMP threads spin ~300,000 times after each parallel region before they sleep. Decode steps run
# on ripelm's own thread pool (kernels/native), and a spinning OpenMP thread between two steps takes the
# core a native worker needs: 2 threads on a 2-core Zen 3, 9.8 ms a step with 10,000 spins against 18 ms
# with the default. Prefill's large matmuls do not notice. Set before torch loads libgomp; a value the
# user set wins.
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
