"""The even, contiguous split that the course uses wherever n things are shared among k ranks.

Ring collectives cut a flat tensor into one chunk per rank (chapter 1); data-parallel serving gives each
rank a block of requests (chapter 4). Both are the same split, with the same sizes as `torch.tensor_split`:
sizes differ by at most one, and the first `numel % n` parts take the extra element.
"""


def chunk_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """Split range(numel) into n contiguous chunks whose sizes differ by at most one (as torch.tensor_split):
    chunk_bounds(10, 4) -> [(0, 3), (3, 6), (6, 8), (8, 10)]."""
    base, extra = divmod(numel, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """The indices of `num_items` requests that `rank` serves: a contiguous block, the first
    `num_items % world_size` ranks taking one extra (uneven shards, no padding, nothing duplicated).

    shard_indices(10, r, 4) -> [0, 1, 2], [3, 4, 5], [6, 7], [8, 9]
    """
    return list(range(*chunk_bounds(num_items, world_size)[rank]))
