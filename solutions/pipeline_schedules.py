"""Chapter 3 pipeline schedules: the 1F1B order of actions (run it in notebooks/03_pipeline_parallel.ipynb)."""
from helpers.course.schedule_sim import Action


def one_f_one_b_order(num_stages: int, num_micro_batches: int) -> list[list[Action]]:
    """Exercise 3.3 — the 1F1B order of actions of every rank (PipeDream-Flush / Megatron).

    Returns `orders` with orders[rank] the ordered list of Action("F", mb) / Action("B", mb) of that rank,
    for ranks 0..num_stages-1 (rank r holds stage r) and micro-batches 0..num_micro_batches-1.
    Rank r warms up with min(p - 1 - r, m) forwards, then alternates one forward and one backward, and
    ends with the backwards left (cool-down). No rank ever holds more than p - r activations.
    """
    p, m = num_stages, num_micro_batches
    orders = []
    for rank in range(p):
        warmup = min(p - 1 - rank, m)
        ops = [Action("F", mb) for mb in range(warmup)]
        for k in range(m - warmup):
            ops += [Action("F", warmup + k), Action("B", k)]
        ops += [Action("B", mb) for mb in range(m - warmup, m)]
        orders.append(ops)
    return orders
