"""Launcher latency: helpers.launch vs torchrun for the same 4-rank all_reduce job."""
import os
import statistics
import subprocess
import sys
import tempfile
import time

from helpers import launch
from helpers.examples import all_reduce_demo


def run(world_size: int = 4, repeats: int = 10, torchrun_repeats: int = 3):
    launch(all_reduce_demo, world_size, show_output=False)  # warm: imports, page cache
    ours = []
    for _ in range(repeats):
        start = time.perf_counter()
        launch(all_reduce_demo, world_size, show_output=False)
        ours.append(time.perf_counter() - start)
    theirs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(torchrun_repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={world_size}", "-m", "helpers.run", "helpers.examples:all_reduce_demo"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
            theirs.append(time.perf_counter() - start)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"launch()  {world_size}-rank all_reduce job, median of {repeats}: {a * 1e3:8.1f} ms")
    print(f"torchrun  {world_size}-rank all_reduce job, median of {torchrun_repeats}: {b * 1e3:8.1f} ms")
    print(f"launch() is {b / a:.0f}x faster to start than torchrun (torchrun is for many machines; "
          f"launch() is for notebook cells)")
