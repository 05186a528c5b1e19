"""Helpers shared by every chapter: the launcher, the implementation switch, tracing, plots, grading."""
from helpers.launch import JobTimeout, LaunchError, RankFailed, launch, rank_device
from helpers.impl import load_impl

__all__ = ["launch", "rank_device", "load_impl", "LaunchError", "RankFailed", "JobTimeout"]
