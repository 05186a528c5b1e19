"""helpers/course/parameter_server.py on real processes: synchronous all-reduce SGD equals single-process SGD;
the asynchronous parameter server applies every pushed gradient, records sane staleness, and converges.
Nothing here depends on timing (the straggler's delay only changes the order of updates)."""
import torch

from helpers import launch
from helpers.claims import tolerance
from helpers.course.parameter_server import (async_sgd, full_batch_sgd, least_squares_problem, loss, replay_async,
                                      sync_sgd)

LR, STEPS, DELAYS_MS = 0.05, 10, [1, 1, 1, 4]
# Bounds: float64 eps × the magnitude of the values × a rounding budget of a few ulps per step (the all-reduce
# sums the 4 gradients in another order than torch.stack(...).sum does), per CONTRIBUTING's tolerance policy.
ROUNDING = 16 * STEPS


def test_sync_sgd_equals_single_process_full_batch_sgd():
    results = launch(sync_sgd, 4, lr=LR, steps=STEPS, delays_ms=DELAYS_MS, show_output=False)
    w_single, losses_single = full_batch_sgd(LR, STEPS)
    for rank, r in enumerate(results):
        err = (r["w"] - w_single).abs().max().item()
        bound = tolerance(w_single, torch.float64, ROUNDING)
        assert err <= bound, f"rank {rank}: weights differ from single-process SGD by {err:.3e} > {bound:.3e}"
        losses, want = torch.tensor(r["losses"]), torch.tensor(losses_single)
        err = (losses - want).abs().max().item()
        bound = tolerance(want, torch.float64, ROUNDING)
        assert err <= bound, f"rank {rank}: losses differ from single-process SGD by {err:.3e} > {bound:.3e}"
    assert len(results[0]["events"]) == 2 * STEPS


def test_async_parameter_server_applies_every_gradient_and_converges():
    results = launch(async_sgd, 5, lr=LR, steps=STEPS, delays_ms=DELAYS_MS, show_output=False)
    server = results[0]
    workers = 4
    assert len(server["staleness"]) == len(server["schedule"]) == len(server["losses"]) == workers * STEPS
    assert all(s >= 0 for s in server["staleness"])
    # every worker pushed exactly STEPS gradients, and a worker never pulls a version from the future
    assert sorted(w for w, _ in server["schedule"]) == sorted(list(range(workers)) * STEPS)
    assert all(pulled <= i for i, (_, pulled) in enumerate(server["schedule"]))
    A, b = least_squares_problem()
    start = loss(A, b, torch.zeros(A.shape[1], dtype=torch.float64))
    assert server["losses"][-1] < 0.5 * start
    # the server's weights are exactly what its recorded schedule implies
    w_replay, losses_replay = replay_async(server["schedule"], LR)
    err = (w_replay - server["w"]).abs().max().item()
    assert err <= tolerance(w_replay, torch.float64, ROUNDING), \
        f"the server's weights differ from a replay of its recorded schedule by {err:.3e}"
    assert {e["label"] for e in server["events"]} == {"W"}
    assert {e["label"] for r in results[1:] for e in r["events"]} == {"F", "comm"}
