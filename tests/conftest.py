"""Shared fixtures. Grader tests get the implementation under test with `load_impl(...)` inside the test,
so a missing or broken module fails that test, not the whole collection."""
import os

# Graders run many small jobs: a hung exercise should fail in seconds, not the teaching default of 60 s.
# launch() reads COURSE_TIMEOUT at each call, so this applies although helpers.launch is imported earlier
# (by the grade plugin, `-p helpers.grade`).
os.environ.setdefault("COURSE_TIMEOUT", "30")
# The test process never falls back to the reference answers. nbval imports ipykernel into this process, which
# would otherwise switch the notebook fallback on (helpers/impl.py) and let a labs stub be replaced in place.
# Kernels the tests start (nbval, tests/test_learner_path.py) decide for themselves: the learner-path tests
# remove COURSE_FALLBACK from their kernels' environment.
os.environ.setdefault("COURSE_FALLBACK", "0")
