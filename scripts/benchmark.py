"""Measure speed and scale on this machine: `python scripts/benchmark.py [quick=true] [out=results/benchmark]`.

Writes benchmark.json and benchmark.md (see metricsearch.benchmarks.speed for what each section measures). The GPU
sections run when CUDA is available; the report says which targets this machine could measure. `--quick --sections
eval --out DIR` means the same as `quick=true sections=eval out=DIR`; --help lists the options.
"""

import sys

from metricsearch.cli.benchmarks import main_benchmark

if __name__ == "__main__":
    sys.exit(main_benchmark(sys.argv[1:]))
