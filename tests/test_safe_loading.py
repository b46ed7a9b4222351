"""Checkpoints load without running code: RecBole's and the plugin's files pass the allowlist,
a planted pickle is refused before it runs, and a trusted file still loads in full."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

import recbole_llmalign  # noqa: F401
from recbole_llmalign.compat import load_checkpoint
from recbole_llmalign.safe_load import UnsafeCheckpointError
from tests.conftest import cyclic_config, newest_file


class _WritesAFile:
    """What a malicious checkpoint holds: unpickling it writes ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('code ran')",)


class _BuildsAModel:
    """Unpickling it would call a model class, whose constructor loads files named by its arguments."""

    def __reduce__(self):
        from recbole.model.sequential_recommender.sasrec import SASRec

        return SASRec, ({"backbone_checkpoint": "elsewhere.pth"}, None)


def _same_checkpoint(safe: dict, full: dict) -> None:
    assert safe.keys() == full.keys()
    assert safe["state_dict"].keys() == full["state_dict"].keys()
    assert all(torch.equal(safe["state_dict"][k], full["state_dict"][k]) for k in full["state_dict"])
    ours = {k: v for k, v in safe["config"].final_config_dict.items() if k != "trust_checkpoint"}
    theirs = {k: v for k, v in full["config"].final_config_dict.items() if k != "trust_checkpoint"}
    assert ours == theirs
    assert safe["config"].model_class is full["config"].model_class  # the real class, put back after loading


def _run_recbole(data_path: str, name: str, model: str) -> Path:
    from recbole.quick_start import run_recbole

    overrides = {"train_neg_sample_args": None} if model == "SASRec" else {}
    run_recbole(model=model, dataset=name, config_dict=cyclic_config(data_path, **overrides))
    return newest_file("saved", f"{model}-*.pth")


@pytest.mark.parametrize("model", ["SASRec", "Pop"])
def test_checkpoints_of_recboles_own_run_recbole_load_under_the_allowlist(cyclic_dataset, model):
    from recbole.quick_start import load_data_and_model as recbole_load

    from recbole_llmalign.quick_start import load_data_and_model

    checkpoint = _run_recbole(*cyclic_dataset, model)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint, weights_only=True)  # torch's safe loader alone cannot read RecBole's files
    _same_checkpoint(load_checkpoint(checkpoint), torch.load(checkpoint, weights_only=False))
    config, loaded, *_ = load_data_and_model(checkpoint)
    assert type(loaded).__name__ == model and config["trust_checkpoint"] is False
    _, through_recbole, *_ = recbole_load(str(checkpoint))  # RecBole's own loader goes through the allowlist too
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), through_recbole.state_dict().values()))


def test_plugin_checkpoint_latest_state_and_topk_cache_load_under_the_allowlist(trained_backbone, tmp_path):
    import numpy as np

    from recbole_llmalign.serving import TopKCache, precompute_topk

    _, _, checkpoint = trained_backbone
    _same_checkpoint(load_checkpoint(checkpoint), torch.load(checkpoint, weights_only=False))
    latest = next(Path("saved", "latest").glob("AlignSASRec-*.pth"))
    safe, full = load_checkpoint(latest), torch.load(latest, weights_only=False)
    assert all(torch.equal(safe["state_dict"][k], v) for k, v in full["state_dict"].items())
    assert np.array_equal(safe["rng"]["numpy"][1], full["rng"]["numpy"][1]) and safe["rng"]["python"] == full["rng"]["python"]
    assert safe["best_valid_score"] == full["best_valid_score"]

    cache = TopKCache(precompute_topk(checkpoint, tmp_path / "topk.pth", topk=3, show_progress=False), model_file=checkpoint)
    assert len(cache.lookup("u1")) == 3

    resaved = tmp_path / "resaved.pth"  # torch.save's own protocol 2, read by torch's safe unpickler
    torch.save(load_checkpoint(checkpoint), resaved)
    assert load_checkpoint(resaved)["config"].model_class.__name__ == "AlignSASRec"
    torch.save(load_checkpoint(checkpoint), resaved, _use_new_zipfile_serialization=False)  # torch's pre-zip format
    with pytest.warns(UserWarning, match="source code"):  # that format stores module classes with their source
        assert load_checkpoint(resaved)["config"].model_class.__name__ == "AlignSASRec"


def test_a_loaded_configs_trust_is_the_loaders_never_the_files(trained_backbone, tmp_path):
    from recbole_llmalign.config import Config

    _, name, checkpoint = trained_backbone
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["trust_checkpoint"] = True  # a shared file asking that its backbone be fully unpickled
    planted = tmp_path / "asks-for-trust.pth"
    torch.save(state, planted, pickle_protocol=4)
    assert load_checkpoint(planted)["config"]["trust_checkpoint"] is False
    assert load_checkpoint(planted, trust=True)["config"]["trust_checkpoint"] is True
    assert Config(model="Pop", dataset=name, config_dict={"data_path": state["config"]["data_path"][:-len(name) - 1],
                                                          "state": "ERROR"})["trust_checkpoint"] is False


@pytest.mark.parametrize("protocol", [2, 4])  # torch.save's default, and what RecBole's trainer writes
def test_a_planted_pickle_is_refused_writes_nothing_and_loads_when_trusted(tmp_path, protocol):
    marker = tmp_path / "written-by-the-checkpoint"
    evil = tmp_path / "shared.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "other_parameter": _WritesAFile(marker)}, evil, pickle_protocol=protocol)

    with pytest.raises(UnsafeCheckpointError, match=r"(?s)needs builtins\.exec.*trust_checkpoint: True.*--trust_checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
    loaded = load_checkpoint(evil, trust=True)
    assert marker.read_text() == "code ran" and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_a_planted_pickle_inside_a_real_recbole_checkpoint_is_refused_everywhere(cyclic_dataset, tmp_path, capsys):
    from recbole.quick_start import load_data_and_model as recbole_load

    from recbole_llmalign.cli import main
    from recbole_llmalign.quick_start import load_data_and_model

    state = torch.load(_run_recbole(*cyclic_dataset, "SASRec"), weights_only=False)
    marker = tmp_path / "written-by-the-checkpoint"
    state["other_parameter"] = _WritesAFile(marker)
    evil = tmp_path / "SASRec-shared.pth"
    torch.save(state, evil, pickle_protocol=4)  # as RecBole's trainer saves

    for load in (lambda: load_data_and_model(evil), lambda: recbole_load(str(evil))):
        with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
            load()
        assert not marker.exists()
    for command in (["recommend", f"--model_file={evil}", "--user=u1"],
                    ["precompute", f"--model_file={evil}", f"--output={tmp_path / 'topk.pth'}"]):
        assert main(command) == 2  # the CLI: one error line naming the global and the trust flag
        assert "builtins.exec" in capsys.readouterr().err and not marker.exists()
    main(["recommend", f"--model_file={evil}", "--user=u1", "--trust_checkpoint"])  # the flag reaches the loader
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_model_class_in_a_file_is_never_called(tmp_path, protocol):
    path = tmp_path / "builds-a-model.pth"
    torch.save({"model": _BuildsAModel()}, path, pickle_protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"sasrec\.SASRec \(called\)"):
        load_checkpoint(path)


def _legacy_torch_file(path: Path, payload: bytes) -> None:
    """torch's pre-zip file format around a hand-written pickle ``payload``."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    with open(path, "wb") as out:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": sys.byteorder == "little",
                                                        "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, out, protocol=2)
        out.write(payload)
        pickle.dump([], out, protocol=2)  # no storages


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_file_cannot_set_attributes_of_an_allowlisted_class(tmp_path, protocol):
    """``yaml.FullLoader`` is allowlisted (every Config names it); a BUILD on the class itself would
    rewrite how RecBole parses YAML for the rest of the process."""
    import yaml

    attribute = b"planted_attribute"
    body = b"cyaml.loader\nFullLoader\nN}X" + struct.pack("<I", len(attribute)) + attribute + b"K\x01s\x86b."
    payload = b"\x80\x02" + body if protocol == 2 else b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body
    pickle.loads(payload)  # unrestricted, the payload does what it says
    assert yaml.loader.FullLoader.planted_attribute == 1
    del yaml.loader.FullLoader.planted_attribute

    path = tmp_path / "legacy.pth"
    _legacy_torch_file(path, payload)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.type \(its state set\)"):
        load_checkpoint(path)
    assert not hasattr(yaml.loader.FullLoader, "planted_attribute")


def test_a_checkpoint_this_run_wrote_reloads_in_full_and_a_changed_one_does_not(cyclic_dataset, tmp_path):
    """RecBole's SASRecF pickles its feature layer (with the dataset) into its checkpoint: outside the
    allowlist, but RecBole's trainer reloads the file it just wrote for testing, which must work."""
    from recbole_llmalign.compat import load_checkpoint
    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.safe_load import UnsafeCheckpointError

    data_path, name = cyclic_dataset
    config = cyclic_config(data_path, load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]},
                           selected_features=["genre"], pooling_mode="mean")
    result, cost = run_with_cost("SASRecF", name, config_dict=config)
    assert cost.checkpoint and "ndcg@5" in result["test_result"]  # the best checkpoint was reloaded for the test
    assert load_checkpoint(cost.checkpoint)["config"]["model"] == "SASRecF"  # written by this process: trusted
    copy = tmp_path / "shared-SASRecF.pth"
    copy.write_bytes(Path(cost.checkpoint).read_bytes())
    with pytest.raises(UnsafeCheckpointError, match="needs"):  # the same bytes from elsewhere: the allowlist applies
        load_checkpoint(copy)
    with open(cost.checkpoint, "ab") as handle:  # changed since this process wrote it
        handle.write(b"\0")
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        load_checkpoint(cost.checkpoint)


def test_a_refusal_crosses_a_process_boundary_with_its_message():
    import pickle

    from recbole_llmalign.safe_load import UnsafeCheckpointError

    error = pickle.loads(pickle.dumps(UnsafeCheckpointError("x.pth", ["builtins.exec"])))
    assert isinstance(error, UnsafeCheckpointError) and error.needs == ["builtins.exec"] and "trust_checkpoint" in str(error)
