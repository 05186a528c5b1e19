"""Shared fixtures. Grader tests get the implementation under test with `load_impl(...)` inside the test,
so a missing or broken module fails that test, not the whole collection."""
import os

# Graders run many small jobs: a hung exercise should fail in seconds, not the teaching default of 60 s.
# launch() reads COURSE_TIMEOUT at each call, so this applies although helpers.launch is imported earlier
# (by the grade plugin, `-p helpers.grade`).
os.environ.setdefault("COURSE_TIMEOUT", "30")
