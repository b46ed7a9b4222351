"""AlignSASRec and its text side: fusion masks, cache integrity, alignment, cold items, training modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign.model.layers import info_nce
from recbole_llmalign.text.cache import EmbeddingCache, cache_key
from recbole_llmalign.text.fusion import CrossAttentionFusion
from recbole_llmalign.trainer import all_positions_index
from tests.conftest import cyclic_config, write_atomic


def test_fusion_masks_missing_reviews_and_falls_back_for_items_without_text():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(meta_dim=8, review_dim=6, hidden_size=16, n_heads=2, dropout=0.0).eval()
    meta = torch.randn(4, 8)
    has_meta = torch.tensor([True, True, False, False])
    reviews = torch.randn(4, 3, 6)
    review_mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False], [False, False, False]])
    fused, weights = fusion(meta, has_meta, reviews, review_mask)
    assert fused.shape == (4, 16) and weights.shape == (4, 4)
    assert torch.isfinite(fused).all()
    assert torch.all(weights[0, 3] == 0) and torch.allclose(weights[0].sum(), torch.tensor(1.0))
    assert torch.allclose(weights[1], torch.tensor([1.0, 0, 0, 0]))  # metadata only
    assert weights[2, 0] == 0 and torch.allclose(weights[2, 1], torch.tensor(1.0))  # one review, no metadata
    assert torch.all(weights[3] == 0) and torch.equal(fused[3], fusion.fallback.detach())  # no text at all
    # Changing a masked review changes nothing.
    reviews_changed = reviews.clone()
    reviews_changed[0, 2] += 100
    assert torch.allclose(fusion(meta, has_meta, reviews_changed, review_mask)[0], fused)


def test_cache_detects_corruption_and_stale_keys(tmp_path):
    cache = EmbeddingCache(tmp_path)
    key = cache_key(dataset="d", encoder="e", texts=["a", "b"])
    builds = []

    def build():
        builds.append(1)
        return {"embedding": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first, hit = cache.get_or_build("d-meta", key, build)
    assert not hit and len(builds) == 1
    second, hit = cache.get_or_build("d-meta", key, build)
    assert hit and len(builds) == 1 and np.array_equal(first["embedding"], second["embedding"])

    path = cache.path("d-meta", key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.load("d-meta", key) is None  # corrupt: not trusted
    _, hit = cache.get_or_build("d-meta", key, build)
    assert not hit and len(builds) == 2

    path.write_bytes(b"not a zip file")
    assert cache.load("d-meta", key) is None
    other_key = cache_key(dataset="d", encoder="e", texts=["a", "changed"])
    assert other_key != key and cache.load("d-meta", other_key) is None


def test_info_nce_ignores_duplicate_targets_as_negatives():
    anchors = torch.eye(3)
    positives = torch.eye(3)
    ids = torch.tensor([5, 5, 7])
    aligned = info_nce(anchors, positives, 0.1, ids)
    shuffled = info_nce(anchors, positives[[2, 0, 1]], 0.1)
    assert aligned < shuffled


def test_all_positions_windows_cover_every_training_target_once():
    users = np.array([1] * 12 + [2] * 3 + [3] * 1)
    index = all_positions_index(users, window=5)
    assert index.tolist() == [1, 6, 11, 14, 15]
    # Each kept row's window (its last `window` targets) tiles the user's rows exactly.
    covered = []
    for row in index:
        start = row
        while start > 0 and users[start - 1] == users[row] and row - start + 1 < 5:
            start -= 1
        covered.extend(range(start, row + 1))
    assert sorted(covered) == list(range(len(users)))


def test_holdout_leaves_each_users_last_targets_out_of_the_backbone_and_gives_them_to_alignllmrec():
    from recbole_llmalign.trainer import distance_to_user_end

    users = np.array([1, 1, 1, 1, 2, 2, 2])
    assert distance_to_user_end(users).tolist() == [3, 2, 1, 0, 2, 1, 0]
    index = all_positions_index(users, window=2, holdout=1)
    assert index.tolist() == [0, 2, 5]  # windows end at each user's second-to-last row
    covered = {r for row in index for r in range(max(row - 1, 0), row + 1) if users[r] == users[row]}
    assert covered == {0, 1, 2, 4, 5}  # every target but the users' last ones (rows 3 and 6)


def test_items_seen_only_in_held_out_targets_count_as_untrained():
    """A backbone with holdout_last_targets N trains no window that reaches a user's last N targets."""
    from types import SimpleNamespace

    from recbole_llmalign.model.unseen_items import training_items

    # user 1 saw 1, 2, 3, 4 and user 2 saw 5, 6, 7: one row per prefix, users contiguous, in time order
    inter = {"user_id": torch.tensor([1, 1, 1, 2, 2]), "item_id": torch.tensor([2, 3, 4, 6, 7]),
             "item_id_list": torch.tensor([[1, 0, 0], [1, 2, 0], [1, 2, 3], [5, 0, 0], [5, 6, 0]])}
    dataset = SimpleNamespace(inter_feat=inter, uid_field="user_id", iid_field="item_id", item_id_list_field="item_id_list")
    assert torch.nonzero(training_items(dataset, 9)).squeeze(1).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert torch.nonzero(training_items(dataset, 9, holdout=1)).squeeze(1).tolist() == [1, 2, 3, 5, 6]  # not 4, 7
    assert torch.nonzero(training_items(dataset, 9, holdout=2)).squeeze(1).tolist() == [1, 2]  # user 2: no row left


def _build(config_dict: dict, dataset: str = "cyclic"):
    from recbole.data import create_dataset

    from recbole_llmalign.config import Config
    from recbole_llmalign.data import prepare_dataset
    from recbole_llmalign.data.new_items import data_preparation  # RecBole's, plus the new-item protocol
    from recbole_llmalign.utils import get_model

    config = Config(model="AlignSASRec", dataset=dataset, config_dict=config_dict)
    prepare_dataset(config)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    model = get_model("AlignSASRec")(config, train._dataset)
    return config, data, model, (train, valid, test)


def test_alignment_loss_falls_and_item_table_is_computed_once_per_evaluation(cyclic_dataset):
    from recbole_llmalign.trainer import AlignSASRecTrainer

    data_path, _ = cyclic_dataset
    config, _, model, (train, valid, _) = _build(cyclic_config(
        data_path, item_text_fields=["title", "genre"], epochs=8, hidden_dropout_prob=0.1, attn_dropout_prob=0.1,
        id_text_align_weight=1.0, seq_text_align_weight=1.0, eval_batch_size=16))
    batch = next(iter(train))
    model.eval()
    with torch.no_grad():
        before = model.calculate_loss(batch)[1].item()
    trainer = AlignSASRecTrainer(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    model.eval()
    with torch.no_grad():
        after = model.calculate_loss(batch)[1].item()
    assert after < 0.8 * before

    calls = []
    model.fusion.register_forward_hook(lambda *args: calls.append(1))
    trainer.evaluate(valid, load_best_model=False, show_progress=False)  # 120 users in batches of 16
    assert len(calls) == 1


def _cold_item_fixture(root) -> None:
    """Two taste groups with real-language titles; two items nobody interacted with.

    Space fans only see space-opera films, cooks only see cookware. The cold items are a new
    space film and a new frying pan: a user's score should follow the text of the cold item.
    """
    space = ["Galactic Empire Space War", "Starship Battle Among The Stars", "Alien Planet Invasion Space Fleet",
             "Space Station Rescue Mission", "Rocket Astronaut Journey To Mars", "Interstellar Star Fleet Commander"]
    kitchen = ["Nonstick Frying Pan Cookware", "Stainless Steel Cooking Pot", "Cast Iron Skillet For Kitchen",
               "Chef Knife For Cooking", "Kitchen Saucepan With Lid", "Baking Sheet Pan Cookware"]
    items = [(f"s{i}", t) for i, t in enumerate(space)] + [(f"k{i}", t) for i, t in enumerate(kitchen)]
    items += [("cold_space", "Space Fleet Star War Galaxy Battle"), ("cold_pan", "Frying Pan Skillet Cookware")]
    rows = []
    rng = np.random.default_rng(0)
    for user in range(60):
        pool = [f"s{i}" for i in range(6)] if user % 2 == 0 else [f"k{i}" for i in range(6)]
        for step, item in enumerate(rng.choice(pool, size=10)):
            rows.append([f"u{user}", item, step])
    write_atomic(root / "cold" / "cold.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    write_atomic(root / "cold" / "cold.item", ["item_id:token", "title:token_seq"], [list(i) for i in items])


def test_cold_item_with_matching_text_outranks_cold_item_with_unrelated_text(tmp_path):
    from recbole_llmalign.trainer import AlignSASRecTrainer

    _cold_item_fixture(tmp_path / "data")
    config_dict = cyclic_config(str(tmp_path / "data"), item_text_fields=["title"], epochs=15,
                                load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
                                hidden_dropout_prob=0.1, attn_dropout_prob=0.1)
    config, data, model, (train, valid, test) = _build(config_dict, "cold")
    AlignSASRecTrainer(config, model).fit(train, valid, saved=False, show_progress=False)
    model.eval()
    cold_space, cold_pan = data.token2id("item_id", ["cold_space", "cold_pan"])
    wins = total = 0
    with torch.no_grad():
        for batch in test:
            interaction = batch[0]
            scores = model.full_sort_predict(interaction)
            users = [data.id2token("user_id", u) for u in interaction["user_id"].tolist()]
            space_fan = torch.tensor([int(u[1:]) % 2 == 0 for u in users])
            prefers_space = scores[:, cold_space] > scores[:, cold_pan]
            wins += int((prefers_space == space_fan).sum())
            total += len(users)
    assert wins / total >= 0.9


def test_id_only_setting_needs_no_text(cyclic_dataset):
    data_path, _ = cyclic_dataset
    _, _, model, _ = _build(cyclic_config(data_path, item_representation="id"))
    assert not hasattr(model, "fusion")


def test_unknown_setting_values_are_rejected(cyclic_dataset):
    data_path, _ = cyclic_dataset
    with pytest.raises(ValueError, match="train_mode must be one of"):
        _build(cyclic_config(data_path, item_text_fields=["title"], train_mode="every"))


def test_reviews_only_items_are_encoded_from_training_reviews_and_attended(tmp_path):
    """A dataset without metadata (as Amazon review dumps): item text comes from reviews alone."""
    rows = []
    for user in range(1, 9):
        for step in range(5):
            item = (user + step) % 6 + 1
            rows.append([f"u{user}", f"i{item}", 1000 + step, f"great sound on item {item}, says user {user}"])
    write_atomic(tmp_path / "data" / "revonly" / "revonly.inter",
                 ["user_id:token", "item_id:token", "timestamp:float", "review:token_seq"], rows)
    _, _, model, _ = _build(cyclic_config(str(tmp_path / "data"), item_text_fields=[], review_field="review",
                                          max_reviews_per_item=3, load_col={"inter": ["user_id", "item_id", "timestamp"]}),
                            "revonly")
    assert model.text_review_mask.any(dim=1)[1:].all()  # every real item has a training review
    assert not model.text_has_meta.any()
    model.eval()
    with torch.no_grad():
        fused, weights = model.fused_text()
    assert torch.isfinite(fused).all()
    assert torch.allclose(weights[1:, 1:].sum(dim=1), torch.ones(weights.size(0) - 1))  # all weight on reviews


def test_evaluation_item_table_is_built_in_bounded_chunks_with_the_same_scores(cyclic_dataset):
    data_path, _ = cyclic_dataset
    _, _, model, (_, _, test) = _build(cyclic_config(data_path, item_text_fields=["title", "genre"], eval_item_chunk=7))
    model.eval()
    calls = []
    model.fusion.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].size(0)))
    chunked = model._scoring_table()
    assert max(calls) <= 7 and sum(calls) == model.n_items and len(calls) == -(-model.n_items // 7)
    with torch.no_grad():
        whole = model._item_table()[0]
    assert torch.allclose(chunked, whole, atol=1e-6)
    interaction = next(iter(test))[0]
    assert model.full_sort_predict(interaction).shape == (len(interaction), model.n_items)
    with pytest.raises(ValueError, match="eval_item_chunk must be a positive"):
        _build(cyclic_config(data_path, item_text_fields=["title", "genre"], eval_item_chunk=0))


@pytest.mark.parametrize("train_mode", ["all_positions", "prefix"])
def test_trimming_padding_columns_changes_no_score_or_loss(cyclic_dataset, train_mode):
    """Histories are cut to the longest one in the batch; the result must equal the padded computation."""
    data_path, _ = cyclic_dataset
    _, _, model, (train, valid, _) = _build(cyclic_config(data_path, item_representation="id", MAX_ITEM_LIST_LENGTH=20,
                                                          train_mode=train_mode))
    model.eval()
    seq_field, len_field = model.ITEM_SEQ, model.ITEM_SEQ_LEN
    for batch in (next(iter(train)), next(iter(valid))[0]):
        item_seq, seq_len = batch[seq_field], batch[len_field]
        assert int(seq_len.max()) < item_seq.size(1)  # the fixture leaves padding to cut
        with torch.no_grad():
            table = model._scoring_table()
            padded = model.gather_indexes(model._encode(item_seq, table), seq_len - 1)
            torch.testing.assert_close(model._user_vectors(batch, table), padded)
    batch = next(iter(train))
    with torch.no_grad():
        trimmed_loss = model.calculate_loss(batch)
        model._trim = lambda item_seq, seq_len: item_seq  # the untrimmed computation
        torch.testing.assert_close(model.calculate_loss(batch), trimmed_loss)


def _rank_of_matching_cold_item(tmp_path, unseen_items: str) -> float:
    """Mean rank (1 = top, of 14) of the cold item that matches each user's taste, after training."""
    from recbole_llmalign.trainer import AlignSASRecTrainer

    _cold_item_fixture(tmp_path / unseen_items)
    config_dict = cyclic_config(str(tmp_path / unseen_items), item_text_fields=["title"], epochs=15, unseen_items=unseen_items,
                                load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
                                hidden_dropout_prob=0.1, attn_dropout_prob=0.1)
    config, data, model, (train, valid, test) = _build(config_dict, "cold")
    assert int(model.unseen_item_mask.sum()) == 2  # the two cold items, nothing else (not the padding row)
    AlignSASRecTrainer(config, model).fit(train, valid, saved=False, show_progress=False)
    model.eval()
    cold_space, cold_pan = data.token2id("item_id", ["cold_space", "cold_pan"])
    ranks = []
    with torch.no_grad():
        for batch in test:
            scores = model.full_sort_predict(batch[0])[:, 1:]
            users = [data.id2token("user_id", u) for u in batch[0]["user_id"].tolist()]
            for row, user in zip(scores, users):
                target = (cold_space if int(user[1:]) % 2 == 0 else cold_pan) - 1
                ranks.append(int((row > row[target]).sum()) + 1)
    return sum(ranks) / len(ranks)


def test_unseen_items_scored_from_text_are_not_trained_down_as_negatives(tmp_path):
    """Plain SASRec training makes an item nobody has bought yet a negative of every step, so even a
    text-aware model ranks it below every trained item of its kind (rank 7 of the 7 that match a
    user's taste). Left out of the softmax and given its text neighbours' ID rows, it ranks among them."""
    as_negatives = _rank_of_matching_cold_item(tmp_path, "negatives")
    from_text = _rank_of_matching_cold_item(tmp_path, "text")
    assert as_negatives >= 6.5 and from_text <= as_negatives - 1.5


def test_unseen_items_get_no_training_gradient_and_borrow_their_id_row_from_text(cyclic_dataset):
    data_path, _ = cyclic_dataset
    for mode, touched in (("text", False), ("negatives", True)):
        config, data, model, (train, _, _) = _build(cyclic_config(
            data_path, item_text_fields=["title", "genre"], new_item_ratio=0.2, unseen_items=mode))
        new = torch.as_tensor(data.new_item_ids)
        assert torch.equal(torch.nonzero(model.unseen_item_mask).squeeze(1).sort().values, new.sort().values)
        loss = model.calculate_loss(next(iter(train)))
        sum(loss).backward()
        assert bool(model.item_embedding.weight.grad[new].abs().sum() > 0) is touched  # negatives push them down
    model.unseen_items = "text"  # the evaluation table: an unseen item's own (untrained) ID row plays no part
    model.eval()
    table = model._scoring_table().clone()
    with torch.no_grad():
        model.item_embedding.weight[new] = torch.randn(len(new), model.hidden_size)
    model.train().eval()  # drops the cached table
    assert torch.allclose(model._scoring_table(), table, atol=1e-6)
    model.unseen_item_neighbours = 0
    model.train().eval()
    assert not torch.allclose(model._scoring_table()[new], table[new], atol=1e-3)  # 0 neighbours: its own row again


def test_a_checkpoint_from_before_unseen_items_loads_with_the_rule_it_was_trained_by():
    from types import SimpleNamespace

    from recbole_llmalign.config import upgrade_config

    old = upgrade_config(SimpleNamespace(final_config_dict={"model": "AlignSASRec"}, model="AlignSASRec"))
    assert old.final_config_dict["unseen_items"] == "negatives"  # not today's default (text)
    assert old.final_config_dict["unseen_item_neighbours"] == 10  # a key without a rule gets its default
    kept = upgrade_config(SimpleNamespace(final_config_dict={"model": "AlignSASRec", "unseen_items": "text"}, model="AlignSASRec"))
    assert kept.final_config_dict["unseen_items"] == "text"


def test_two_backward_passes_of_one_batch_give_the_same_gradient_on_two_threads(cyclic_dataset):
    """Plain indexing's gradient summed repeated item ids in thread order: runs of one seed drifted apart."""
    data_path, _ = cyclic_dataset
    _, _, model, _ = _build(cyclic_config(data_path, item_text_fields=["title"]))
    generator = torch.Generator().manual_seed(0)
    shape = (4096 // model.max_seq_length, model.max_seq_length)  # big enough for 2 threads to split it
    item_seq = torch.randint(1, model.n_items, shape, generator=generator)
    upstream = torch.randn(*shape, model.hidden_size, generator=generator)
    model.eval()  # dropout off: only the summation order could differ
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            model.zero_grad()
            table, _ = model._item_table()
            (model._encode(item_seq, table) * upstream).sum().backward()
            grads.append(model.item_embedding.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])
