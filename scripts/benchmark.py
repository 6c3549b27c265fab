"""Measure speed and scale on this machine: `python scripts/benchmark.py [--quick] [--out results/benchmark]`.

Writes benchmark.json and benchmark.md (see metricsearch.benchmarks.speed for what each section measures). The GPU
sections run when CUDA is available; the report says which targets this machine could measure.
"""

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from metricsearch.benchmarks.speed import SECTIONS, run_speed_benchmark  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"), help="report folder")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes, SOP targets not measured")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--data-dir", type=Path, default=None, help="synthetic training data (default: data/benchmark)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    logging.basicConfig(level=logging.WARNING)
    progress = functools.partial(print, flush=True)
    run_speed_benchmark(args.out, sections=sections, quick=args.quick, data_dir=args.data_dir, log=progress)
    print(f"report: {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
