"""The search benchmark's judge (`benchmarks.search_quality`): which pairs its ground truth resolves once the
training run's own noise, measured over seeds, counts as well as the read's."""

import numpy as np
import pytest

from benchmarks.search_quality import resolved_pairs, resolved_tau, seed_noise, seed_tau

# per-sequence losses shifted by a constant: the paired bootstrap sees no read noise, only the seeds count
BASE = list(np.linspace(3.0, 4.0, 64))


def shifted(by: float) -> list[float]:
    return [v + by for v in BASE]


def test_seed_noise_pools_each_pairs_spread_over_the_seeds():
    # the pair's gap is -0.01 on one seed and +0.01 on the other: variance 2e-4, over 2 seeds 1e-4
    assert seed_noise({"a": [1.00, 1.02], "b": [1.01, 1.01]}) == pytest.approx(0.01)
    assert seed_noise({"a": [1.0], "b": [1.1]}) == 0.0  # one seed: nothing to measure
    assert seed_noise(None) == 0.0


def test_a_pair_the_seeds_order_differently_is_not_resolved():
    truth = {"a": 3.50, "b": 3.52, "c": 3.60}
    per_seq = {"a": shifted(0.0), "b": shifted(0.02), "c": shifted(0.10)}
    # a and b swap between the seeds; c is behind both on both
    by_seed = {"a": [3.47, 3.53], "b": [3.53, 3.51], "c": [3.60, 3.60]}
    assert len(resolved_pairs(truth, per_seq)) == 3  # the read alone resolves every pair
    assert len(resolved_pairs(truth, per_seq, by_seed)) == 2
    # a ranking that swaps a and b is only wrong on a pair the judge cannot tell
    assert resolved_tau({"a": 2.0, "b": 1.0, "c": 3.0}, truth, resolved_pairs(truth, per_seq, by_seed)) == 1.0
    assert resolved_tau({"a": 2.0, "b": 1.0, "c": 3.0}, truth, resolved_pairs(truth, per_seq)) == pytest.approx(1 / 3)


def test_a_gap_within_the_seeds_noise_is_not_resolved_even_when_they_agree():
    truth = {"a": 3.500, "b": 3.501, "c": 3.700}
    per_seq = {k: shifted(v - 3.5) for k, v in truth.items()}
    # every seed orders a < b < c, but the gaps to c move by 0.2 nats between seeds: a's 0.001 to b is noise,
    # the 0.2 to c is not
    by_seed = {"a": [3.400, 3.600], "b": [3.4005, 3.6015], "c": [3.700, 3.700]}
    assert seed_noise(by_seed) > 0.05
    assert len(resolved_pairs(truth, per_seq)) == 3
    assert len(resolved_pairs(truth, per_seq, by_seed)) == 2
    assert seed_tau(by_seed) == 1.0  # both seeds order them alike all the same


def test_a_ground_truth_of_no_seeds_is_refused_in_one_line(monkeypatch, capsys):
    from benchmarks.search_quality import parse_args

    monkeypatch.setattr("sys.argv", ["search_quality", "--truth-seeds", "0"])
    with pytest.raises(SystemExit) as exit_:
        parse_args()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "search_quality: --truth-seeds must be at least 1, got 0"
