"""Bad input across the plugin: every case must raise an error that names the problem and the fix
(or, where the issue asks for defined behaviour, behave as documented), and must not damage
anything written before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import recbole_llmalign  # noqa: F401
from tests.conftest import cyclic_config, write_atomic


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(model: str, dataset: str, **config_dict):
    from recbole_llmalign.config import Config

    return Config(model=model, dataset=dataset, config_dict=config_dict)


def _prepare(model: str, dataset: str, **config_dict):
    from recbole_llmalign.data import prepare_dataset

    config = _config(model, dataset, **config_dict)
    prepare_dataset(config)
    return config


# 1
def test_unknown_model_lists_close_matches():
    from recbole_llmalign.utils import get_model

    with pytest.raises(ValueError, match="(?s)SASRek.*SASRec"):
        get_model("SASRek")


# 2
def test_unknown_dataset_names_the_folder_and_the_offline_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)Unknown dataset 'nope'.*Offline datasets: ml-100k"):
        _prepare("SASRec", "nope", data_path=str(tmp_path / "data"))


# 3
def test_missing_inter_file_in_an_existing_folder(tmp_path):
    (tmp_path / "data" / "mine").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="Missing atomic file .*mine.inter"):
        _prepare("SASRec", "mine", data_path=str(tmp_path / "data"))


# 4
def test_missing_item_file_named_by_load_col(cyclic_dataset):
    data_path, name = cyclic_dataset
    (Path(data_path) / name / f"{name}.item").unlink()
    with pytest.raises(FileNotFoundError, match="(?s)Missing atomic file .*cyclic.item.*remove 'item' from load_col"):
        _prepare("SASRec", name, **cyclic_config(data_path, load_col={"inter": ["user_id", "item_id"], "item": ["item_id"]}))


# 5
def test_missing_field_in_load_col(cyclic_dataset):
    data_path, name = cyclic_dataset
    with pytest.raises(ValueError, match=r"(?s)load_col.inter names \['rating'\].*Fix load_col"):
        _prepare("SASRec", name, **cyclic_config(data_path, load_col={"inter": ["user_id", "item_id", "rating"]}))


# 6
def test_missing_item_text_field(cyclic_dataset):
    data_path, name = cyclic_dataset
    with pytest.raises(ValueError, match=r"(?s)item_text_fields names \['plot'\].*Remove them"):
        _prepare("AlignSASRec", name, **cyclic_config(data_path, item_text_fields=["title", "plot"]))


# 7-9
@pytest.mark.parametrize("key, value, expected", [
    ("llm_layers", "eight", "must be an integer"),
    ("use_layer_prefix", "yes", "must be true or false"),
    ("lora_target_modules", "q_proj", "must be a list"),
])
def test_malformed_key_types_name_the_key_and_its_yaml(key, value, expected):
    with pytest.raises(ValueError, match=f"(?s)'{key}' {expected}.*properties/(model|base)/\\w+.yaml.*Fix it"):
        _config("AlignLLMRec", "ml-100k", **{key: value})


# 10
def test_non_utf8_atomic_file_names_file_offset_and_fix(cyclic_dataset):
    data_path, name = cyclic_dataset
    item_file = Path(data_path) / name / f"{name}.item"
    item_file.write_bytes(item_file.read_bytes().replace(b"Item number 3\t", b"Item n\xe9mero 3\t"))
    before = _digest(item_file)
    with pytest.raises(ValueError, match="(?s)cyclic.item is not valid utf-8: byte 0xe9 at offset .*iconv.*encoding"):
        _prepare("SASRec", name, **cyclic_config(data_path))
    assert _digest(item_file) == before  # the user's file is left as it was


# 11
def test_nan_in_a_float_field_is_filled_not_propagated(cyclic_dataset):
    """Defined behaviour: RecBole fills a missing float with the column mean; no NaN reaches a model."""
    from recbole.data import create_dataset

    data_path, name = cyclic_dataset
    rows = [[f"u{u}", f"i{(u + s) % 30 + 1}", 1000 + s, "" if (u, s) == (1, 3) else 4.0] for u in range(1, 40) for s in range(8)]
    write_atomic(Path(data_path) / name / f"{name}.inter", ["user_id:token", "item_id:token", "timestamp:float", "rating:float"], rows)
    config = _prepare("SASRec", name, **cyclic_config(data_path, load_col={"inter": ["user_id", "item_id", "timestamp", "rating"]}))
    ratings = torch.as_tensor(create_dataset(config).inter_feat["rating"].to_numpy())
    assert len(ratings) == 39 * 8 and not torch.isnan(ratings).any()
    assert torch.allclose(ratings, torch.full_like(ratings, 4.0))  # the one missing value became the mean


# 12
def test_llm_path_that_is_not_a_model_folder(tmp_path):
    from recbole_llmalign.llm.loader import load_causal_lm

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="(?s)not a model folder.*save_pretrained"):
        load_causal_lm(str(tmp_path / "empty"))


# 13
def test_llm_path_holding_an_encoder_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    from recbole_llmalign.llm.loader import load_causal_lm

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="(?s)not a decoder-only causal LM.*Use a decoder-only"):
        load_causal_lm(str(tmp_path / "bert"))


# 14
def test_corrupt_gguf_names_the_file_and_keeps_the_converted_folder(tmp_path):
    from recbole_llmalign.llm.loader import convert_gguf

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    target = tmp_path / "converted"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"earlier conversion")
    with pytest.raises(ValueError, match="(?s)model.gguf cannot be read.*corrupt.*--force-reinstall"):
        convert_gguf(bad, target)
    assert (target / "weights.bin").read_bytes() == b"earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "model.gguf"]  # no staging left behind


# 15
def test_truncated_checkpoint_is_named_with_the_fix(tmp_path):
    from recbole_llmalign.quick_start import load_data_and_model

    checkpoint = tmp_path / "SASRec-x.pth"
    buffer = tmp_path / "whole.pth"
    torch.save({"state_dict": {"w": torch.randn(256)}}, buffer)
    checkpoint.write_bytes(buffer.read_bytes()[:300])
    with pytest.raises(ValueError, match="(?s)SASRec-x.pth is corrupt or truncated.*retrain"):
        load_data_and_model(checkpoint)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data_and_model(tmp_path / "missing.pth")


# 16
def test_corrupt_text_cache_is_rebuilt_not_trusted(tmp_path):
    import numpy as np

    from recbole_llmalign.text.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path)
    file = cache.save("meta", "key-1", {"meta": np.ones((4, 3), dtype=np.float32)})
    assert cache.load("meta", "key-1") is not None
    file.write_bytes(file.read_bytes()[:40])
    assert cache.load("meta", "key-1") is None  # a miss: the caller re-encodes and rewrites atomically


# 17
def test_item_with_no_text_gets_the_fallback_not_nan():
    from recbole_llmalign.text.fusion import CrossAttentionFusion

    fusion = CrossAttentionFusion(6, 5, 8)
    fused, weights = fusion(torch.zeros(2, 6), torch.tensor([False, True]), torch.zeros(2, 2, 5), torch.zeros(2, 2, dtype=torch.bool))
    assert torch.isfinite(fused).all() and torch.equal(fused[0], fusion.fallback.detach()) and weights[0].sum() == 0
