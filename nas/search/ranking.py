"""The statistics of the adaptive horizon, pure (no model, no study): does the order of the best candidates
hold between two rungs, is the top-1 margin beyond the validation noise, why a search stopped, and a
power law in tokens that predicts each curve's loss at the final distillation.

The statistic, and why: Kendall's tau between the losses of two consecutive rungs (or a rung and the
losses its curves predict at the final tokens) over the best `top` of the later one. Tau counts discordant
pairs, so one swap among three costs as much as any other; a rank correlation is what the decision needs
(which candidate wins), not how far the losses moved. Two candidates whose later losses differ by less than
the noise are tied (single-linkage groups of the sorted losses), and tied pairs are left out (Goodman and
Kruskal's gamma), so a swap the data cannot resolve is no reordering, while every pair it can resolve
still counts. The noise is the standard error of the top-1 margin from a paired bootstrap over validation
sequences (scipy.stats.bootstrap): both candidates are scored on the same sequences, so the paired
difference removes the sequences' own difficulty, which dominates an unpaired spread.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

NOISE_Z = 2.0  # "within noise": a margin below 2 standard errors (about 95% two-sided)
STABLE, CAP, ONE_LEFT = "stable", "cap", "one candidate left"
SMALL_SPACE = "small space: every candidate to the horizon"  # older studies' stop of a `whole_space` (read only)


def margin_noise(best: Sequence[float], second: Sequence[float], samples: int = 1000, seed: int = 0) -> float:
    """Standard error of the mean per-sequence loss difference of two candidates on the same validation
    sequences (paired bootstrap over the sequences); 0 with fewer than two sequences."""
    a, b = np.asarray(best, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if len(a) < 2 or len(a) != len(b):
        return 0.0
    res = stats.bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, vectorized=False,
                          n_resamples=samples, method="percentile", rng=np.random.default_rng(seed))  # fmt: skip
    return float(res.standard_error)


def within_noise(losses: dict, noise: float) -> bool:
    """Whether the best two losses differ by at most NOISE_Z x `noise` (equal losses always are)."""
    top = sorted(losses.values())[:2]
    return len(top) == 2 and top[1] - top[0] <= NOISE_Z * noise


def noise_groups(values: Sequence[float], noise: float) -> list[int]:
    """A group index for each of `values`: neighbours (in sorted order) closer than NOISE_Z x `noise` share
    one (single linkage; equal values always do), so that a rank statistic can see them tied."""
    order = np.argsort(values, kind="stable")
    group, out = 0, [0] * len(values)
    for prev, cur in zip(order, order[1:], strict=False):
        group += values[cur] - values[prev] > NOISE_Z * noise
        out[cur] = group
    return out


def top_tau(previous: dict, current: dict, top: int, noise: float = 0.0) -> float | None:
    """Kendall's tau of two rungs' losses over the best `top` of `current` (keys in both), counted over the
    pairs that `current` resolves: candidates within the noise of each other now (`noise_groups`) are a tie,
    and a tie is no pair (Goodman and Kruskal's gamma, (concordant - discordant) / (concordant + discordant);
    tau-b would count ties against the order, so that a swap the data cannot resolve blocks a stop). None
    when it is undefined: fewer than two candidates, or no pair resolved."""
    best = sorted((k for k in current if k in previous), key=lambda k: current[k])[:top]
    groups = noise_groups([current[k] for k in best], noise)
    signs = [
        math.copysign(1.0, (groups[j] - groups[i]) * (previous[b] - previous[a]))
        for i, a in enumerate(best)
        for j, b in enumerate(best[i + 1 :], start=i + 1)
        if groups[i] != groups[j] and previous[a] != previous[b]
    ]
    return float(sum(signs) / len(signs)) if signs else None


def weakest(*taus: float | None) -> float | None:
    """The lowest of the defined taus (the agreement that holds least); None when none is defined."""
    defined = [t for t in taus if t is not None]
    return min(defined) if defined else None


def holds(tau: float | None, stable_tau: float) -> bool:
    """Whether an order held: `tau` >= `stable_tau`, or undefined because every pair is within noise."""
    return tau is None or tau >= stable_tau - 1e-9  # a float tau of an identical order may be 1 - 1e-16


def stop_reason(left: int, tau: float | None, stable_tau: float, spent: int, next_rung: int, cap: int,
                floor: int = 0) -> str | None:  # fmt: skip
    """Why the extension stops after a rung (None: extend): one candidate left, the order of the best
    held (`holds`) with at least `floor` tokens spent, or the next rung would spend more than `cap` tokens
    per candidate."""
    if left <= 1:
        return ONE_LEFT
    if holds(tau, stable_tau) and spent >= floor:
        return STABLE
    if spent + next_rung > cap:
        return CAP
    return None


def power_law(tokens: np.ndarray, floor: float, scale: float, exponent: float) -> np.ndarray:
    """L(t) = floor + scale * t^-exponent, t in units of the last observed tokens (well-conditioned)."""
    return floor + scale * np.power(tokens, -exponent)


def fit_curve(tokens: Sequence[float], losses: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Fit `power_law` to one trial's validation curve (scipy.optimize.curve_fit); returns (floor, scale,
    exponent, unit tokens), or None with fewer than three points or when the fit fails."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        return None
    unit = float(t.max())
    low = float(y.min())
    try:
        with warnings.catch_warnings():  # an exact fit has no covariance estimate: the parameters are fine
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(
                power_law, t / unit, y, p0=(0.9 * low, 0.1 * low, 0.5),
                bounds=([0.0, 0.0, 0.01], [low, np.inf, 3.0]), maxfev=5000,
            )  # fmt: skip
    except (RuntimeError, ValueError):
        return None
    return (*map(float, params), unit)


def predict(fit: tuple[float, float, float, float] | None, tokens: float, fallback: float) -> float:
    """The fitted curve's loss at `tokens`; `fallback` (the last observed loss) without a fit."""
    if fit is None:
        return fallback
    floor, scale, exponent, unit = fit
    return float(power_law(np.asarray(tokens / unit), floor, scale, exponent))
