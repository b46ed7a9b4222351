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


def _budget_trainer_run(cyclic_dataset, resample: bool, start_epoch: int = 0) -> tuple[list[set[int]], int]:
    """Rows each epoch of a SampleBudgetTrainer trained on, on the cyclic fixture (GRU4Rec: no LLM needed)."""
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import GRU4Rec

    from recbole_llmalign.trainer import SampleBudgetTrainer
    from tests.conftest import cyclic_config

    data_path, name = cyclic_dataset
    config = Config(model="GRU4Rec", dataset=name, config_dict=cyclic_config(
        data_path, epochs=3, train_sample_budget=0.1, resample_each_epoch=resample, diversity_buckets=2,
        denoise_samples=False, item_text_fields=[], train_batch_size=16, eval_step=10, train_neg_sample_args=None))
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    trainer = SampleBudgetTrainer(config, GRU4Rec(config, train._dataset).to(config["device"]))
    per_epoch: list[set[int]] = []
    epoch_loop = SampleBudgetTrainer._train_epoch

    def record(self, train_data, epoch_idx, *args, **kwargs):
        result = epoch_loop(self, train_data, epoch_idx, *args, **kwargs)
        per_epoch.append(set(self.drawn_samples) - set().union(*per_epoch) if per_epoch else set(self.drawn_samples))
        return result

    torch.manual_seed(0)
    trainer._train_epoch = record.__get__(trainer)
    trainer.start_epoch = start_epoch  # as resume_checkpoint sets it
    trainer.fit(train, valid, saved=False)
    return per_epoch, trainer.training_samples


def test_resample_each_epoch_draws_a_fresh_seeded_subset_and_off_keeps_one(cyclic_dataset):
    fixed, per_epoch_rows = _budget_trainer_run(cyclic_dataset, resample=False)
    assert len(fixed) == 3 and len(fixed[0]) == per_epoch_rows and fixed[1] == fixed[2] == set()  # nothing new after epoch 1
    fresh, rows = _budget_trainer_run(cyclic_dataset, resample=True)
    assert rows == per_epoch_rows and fresh[0] == fixed[0]  # draw 0 is the default draw
    assert len(fresh[1]) > rows // 2 and len(fresh[2]) > 0  # later epochs bring rows never trained on before
    again, _ = _budget_trainer_run(cyclic_dataset, resample=True)
    assert again == fresh  # seeded by the epoch number


def test_a_resumed_resampling_run_counts_the_draws_of_its_earlier_epochs(cyclic_dataset):
    full, _ = _budget_trainer_run(cyclic_dataset, resample=True)
    resumed, _ = _budget_trainer_run(cyclic_dataset, resample=True, start_epoch=2)
    assert len(resumed) == 1 and resumed[0] == set().union(*full)  # train_samples_distinct as if never stopped
