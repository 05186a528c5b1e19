"""The course's machinery: the launcher, the implementation switch, tracing, claims, plots, grading.

helpers/ holds two kinds of code, kept apart:

* here, at the top level, the machinery every chapter uses and no chapter is about: launch.py (run a function
  on N real ranks), run.py (the same under torchrun), magic.py (%%distributed), impl.py (labs/ or solutions/),
  comm_trace.py, timeline.py (what each rank sent and when), claims.py (verdicts), plots.py and
  collective_plots.py, grade.py, notebooks.py, source.py, widgets.py, bench.py and benchmarks/;
* in helpers/course/, the given course code a chapter builds on and asks you to read (index in its __init__).
"""
from helpers.launch import JobTimeout, LaunchError, RankFailed, launch, rank_device
from helpers.impl import load_impl

__all__ = ["launch", "rank_device", "load_impl", "LaunchError", "RankFailed", "JobTimeout"]
