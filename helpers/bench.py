"""`make bench`: print the figures the course claims, measured on this machine.

Each module in helpers/benchmarks/ has a `run()` that prints its figures. Timings depend on the machine
and on what else runs: quote them with the machine they came from. Run one: `python -m helpers.bench launch`.
"""
import importlib
import pkgutil
import sys
import time

import helpers.benchmarks as benchmarks


def main(argv=None):
    names = (argv if argv is not None else sys.argv[1:]) or [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"helpers.benchmarks.{name}").run()
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
