"""A claim is a check: every sentence that states a result is followed by a verdict the run computes.

    from helpers.claims import verdict, tolerance, check_close
    verdict(p99_cont < p99_static, f"p99: continuous {p99_cont:.2f} s < static {p99_static:.2f} s")
    check_close("TP=2 logits vs one process", got, want)      # ✓ ... max |diff| ~1.5e-05 ≤ 9.2e-05 ...

`verdict` prints `✓ claim` or `✗ claim` and returns the boolean, so nbval (which compares the stored
✓ line) fails the notebook when a fresh run contradicts its prose. Timings inside the claim stay masked by
notebooks/sanitize.cfg (print them with a unit); the ✓/✗ is what is compared.

Tolerance policy (CONTRIBUTING.md): a float bound is `factor × eps(dtype) × scale`, where `scale` is the
magnitude of the values compared (max |reference|, at least 1) and `factor` is stated where it is used
(about the number of rounding steps that separate the two computations: e.g. the length of the dot products
that were split or reordered). Never a literal taken from one machine's run: float32 results differ between
CPU kinds (AVX2 vs AVX-512 kernels sum in different orders).
"""
from __future__ import annotations

import torch

__all__ = ["verdict", "tolerance", "max_abs_diff", "check_close"]

# Default rounding budget: reordered float32 sums over the course's small hidden sizes (≤ 256 terms) stay
# well inside 64 ulps of the largest value; the measured gaps are 1-10 ulps on AVX2 and AVX-512 alike.
DEFAULT_FACTOR = 64


def verdict(ok, claim: str) -> bool:
    """Print `✓ claim` when `ok`, else `✗ claim`; return bool(ok)."""
    ok = bool(ok)
    print(f"{'✓' if ok else '✗'} {claim}")
    return ok


def tolerance(reference, dtype: torch.dtype | None = None, factor: float = DEFAULT_FACTOR) -> float:
    """factor × eps(dtype) × max(1, max |reference|): the bound two float computations of `reference` that
    differ only in the order of their roundings should stay within."""
    if isinstance(reference, torch.Tensor):
        dtype = dtype or (reference.dtype if reference.is_floating_point() else torch.float32)
        scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    else:
        dtype = dtype or torch.float32
        scale = abs(float(reference))
    return factor * torch.finfo(dtype).eps * max(1.0, scale)


def max_abs_diff(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def check_close(what: str, got, want, factor: float = DEFAULT_FACTOR, dtype: torch.dtype | None = None,
                quiet: bool = False) -> bool:
    """Verdict that `got` equals `want` within `tolerance(want, dtype, factor)`. The measured difference is
    printed with `~` (masked by nbval: it depends on the CPU kind); the ✓/✗ is compared."""
    diff, tol = max_abs_diff(got, want), tolerance(torch.as_tensor(want), dtype, factor)
    ok = diff <= tol
    line = f"{what}: max |diff| ~{diff:.1e} ≤ {factor:g} eps × scale" if ok else \
        f"{what}: max |diff| {diff:.3e} > {tol:.3e} ({factor:g} eps × scale)"
    if quiet:
        return ok
    return verdict(ok, line)
