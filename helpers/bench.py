"""`make bench`: print the figures the course claims, measured on this machine.

    python -m helpers.bench                      # every benchmark, with the reference answers
    python -m helpers.bench collectives launch   # some of them
    python -m helpers.bench --impl labs serving  # measure your own exercises instead

Each module in helpers/benchmarks/ has a `run()` that prints its figures; it is found by its file name, nothing
to register. Timings depend on the machine and on what else runs: quote them with the machine they came from.

Which implementation a benchmark measures is chosen here, once, and nowhere else. `--impl labs|solutions`
(default: COURSE_IMPL if it is set, else solutions: the course's figures come from the reference answers) sets
COURSE_IMPL before any benchmark module is imported; the ranks a benchmark launches inherit it. So a benchmark
  * gets an exercise with `load_impl("module")` (from helpers), inside the function that uses it, exactly as
    notebooks and graders do;
  * never imports `labs.x` or `solutions.x`, and never reads or sets COURSE_IMPL itself;
  * says which implementation it measured, where that matters, with `helpers.impl.impl_package()`.
Under `--impl labs`, an exercise not written yet raises its own "Exercise N.M ... is not written yet" error.
"""
import argparse
import importlib
import os
import pkgutil
import time

CHOICES = ("solutions", "labs")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (file names in helpers/benchmarks/); all if none")
    parser.add_argument("--impl", choices=CHOICES, default=os.environ.get("COURSE_IMPL", "solutions"),
                        help="whose exercises to measure (default: COURSE_IMPL if set, else solutions)")
    args = parser.parse_args(argv)
    os.environ["COURSE_IMPL"] = args.impl          # the one place: load_impl and every launched rank read it

    import helpers.benchmarks as benchmarks
    names = args.names or [m.name for m in pkgutil.iter_modules(benchmarks.__path__)]
    print(f"implementation: {args.impl}/ (COURSE_IMPL={args.impl})", flush=True)
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"helpers.benchmarks.{name}").run()
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
