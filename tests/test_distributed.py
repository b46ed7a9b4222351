"""Multi-process training on CPUs (gloo): two ranks reach the metrics of one process with the same
global batch, and one rank writes the checkpoint."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import cyclic_config


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return str(probe.getsockname()[1])


def test_two_cpu_ranks_match_one_process(cyclic_dataset):
    from recbole_llmalign.quick_start import run_distributed, run_with_cost

    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], epochs=20, hidden_dropout_prob=0.1,
                           attn_dropout_prob=0.1, stopping_step=100)
    two, cost = run_distributed("AlignSASRec", name, None, config, nproc=2, port=_free_port())
    assert cost["epochs"] == 20
    checkpoints = sorted(Path("saved").glob("AlignSASRec-*.pth"))
    assert len(checkpoints) == 1 and not list(Path("saved").glob("*.tmp-*"))  # written once, by rank 0
    one, _ = run_with_cost("AlignSASRec", name, config_dict=config)
    for metric in ("ndcg@5", "recall@5"):
        assert one["test_result"][metric] > 0.7
        assert abs(two["test_result"][metric] - one["test_result"][metric]) < 0.05


def test_alignllmrec_trains_and_evaluates_on_two_cpu_ranks(trained_backbone, tiny_llama_dir):
    from recbole_llmalign.quick_start import run_distributed

    data_path, name, checkpoint = trained_backbone
    config = cyclic_config(data_path, item_text_fields=["title", "genre"], backbone_checkpoint=checkpoint,
                           llm_path=str(tiny_llama_dir), llm_layers=2, train_batch_size=32, epochs=2)
    result, cost = run_distributed("AlignLLMRec", name, None, config, nproc=2, port=_free_port())
    assert cost["epochs"] == 2
    # starting from the backbone's ranking (zero head) and validated before training, it ends no worse than the backbone
    assert result["test_result"]["ndcg@5"] >= result["backbone_test_result"]["ndcg@5"] - 0.02
    assert len(list(Path("saved").glob("AlignLLMRec-*.pth"))) == 1
