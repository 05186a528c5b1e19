"""helpers/course/roofline.py: the STREAM measurement and the ceilings built from it."""
from helpers.course.roofline import ceilings, stream_bandwidth


def test_stream_bandwidth_counts_the_bytes_of_copy_and_triad():
    bw = stream_bandwidth(n=1 << 16, repeats=2)
    assert set(bw) == {"copy", "triad"} and all(v > 0 for v in bw.values())


def test_ceilings_take_an_independent_bandwidth():
    rows = [{"tokens": 1, "flop_per_s": 2.0, "bytes_per_s": 4.0}, {"tokens": 8, "flop_per_s": 16.0, "bytes_per_s": 1.0}]
    assert ceilings(rows).bandwidth == 4.0                     # the one-token step's own bytes/s
    roofs = ceilings(rows, bandwidth=8.0)
    assert roofs.bandwidth == 8.0 and roofs.peak_flop_per_s == 16.0 and roofs.ridge == 2.0
