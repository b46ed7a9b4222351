"""Data construction for LLM training: diversity buckets fill a budget evenly; denoising drops unrelated targets."""

from __future__ import annotations

import numpy as np

from recbole_llmalign.data.sampling import content_words, denoise_mask, diversity_sample


def test_budget_is_spread_over_length_and_popularity_buckets():
    rng = np.random.default_rng(0)
    # 90% of samples: long histories with the most popular target; 10%: short histories, tail targets.
    lengths = np.r_[np.full(900, 50), rng.integers(1, 5, 100)]
    targets = np.r_[np.full(900, 1), rng.integers(2, 200, 100)]
    chosen = diversity_sample(lengths, targets, budget=100, length_buckets=2, popularity_buckets=2, seed=1)
    assert len(chosen) == 100 and len(np.unique(chosen)) == 100
    head_share = np.mean(targets[chosen] == 1)
    assert 0.3 <= head_share <= 0.7  # uniform sampling would give about 0.9
    again = diversity_sample(lengths, targets, budget=100, length_buckets=2, popularity_buckets=2, seed=1)
    assert np.array_equal(chosen, again)  # seeded


def test_budget_larger_than_data_keeps_everything_and_candidates_are_respected():
    lengths, targets = np.arange(1, 11), np.arange(1, 11)
    assert diversity_sample(lengths, targets, budget=50).tolist() == list(range(10))
    allowed = np.arange(10) % 2 == 0
    chosen = diversity_sample(lengths, targets, budget=3, candidates=allowed)
    assert len(chosen) == 3 and all(allowed[chosen])


def test_denoising_drops_targets_that_share_no_word_with_the_history():
    words = [set(), content_words("Star Wars: Galaxy"), content_words("Galaxy Quest"), content_words("Cooking Pans"),
             set()]
    histories = np.array([[1, 0], [1, 0], [1, 0], [3, 0]])
    targets = np.array([2, 3, 4, 3])
    assert denoise_mask(histories, targets, words).tolist() == [True, False, True, True]
    assert content_words("The Lord of the Rings") == {"lord", "rings"}
