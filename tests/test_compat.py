"""One test per RecBole breakage on today's stack; each fails without its fix (compat.py or a pin)."""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import recbole_llmalign  # noqa: F401  (applies compat)
from recbole_llmalign import compat
from recbole_llmalign.config import Config
from tests.conftest import cyclic_config, write_atomic


def test_numpy_aliases_let_recbole_config_build(cyclic_dataset):
    for name in compat.NUMPY_ALIASES:
        assert hasattr(np, name), f"np.{name} missing: RecBole's Config and ray's loggers read it"
    data_path, name = cyclic_dataset
    config = Config(model="Pop", dataset=name, config_dict=cyclic_config(data_path))
    assert config["model"] == "Pop"


def test_quick_start_imports_in_a_fresh_interpreter():
    """RecBole's quick_start and FLOPs counter import: thop imports distutils, which Python 3.12
    removed from the standard library (the setuptools pin provides it). Where ray is installed
    (the `ray` extra, Python 3.11), quick_start gets the real ray.tune: ray 2.6.3 needs np.bool8
    (compat) and pkg_resources (the extra's setuptools<81)."""
    code = ("import recbole_llmalign; from recbole.quick_start import run_recbole, load_data_and_model; "
            "from recbole.quick_start import quick_start; from thop.profile import register_hooks; "
            "print(getattr(quick_start.tune, '__name__', repr(quick_start.tune))); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
    if importlib.util.find_spec("ray") is not None:
        assert done.stdout.splitlines()[-2] == "ray.tune", done.stdout  # not the stand-in: ray imports


def test_recbole_quick_start_imports_without_ray():
    """RecBole 1.2.1 imports ray in quick_start, and ray<=2.6.3 has no wheels for Python 3.12+."""
    code = "\n".join([
        "import sys; sys.modules['ray'] = None  # import ray fails, as where it is not installed",
        "import recbole_llmalign",
        "from recbole.quick_start import objective_function, quick_start",
        "quick_start.tune.report(**{'ndcg@10': 0.5})  # objective_function's call: a no-op, as outside a ray session",
        "try:",
        "    quick_start.tune.run",
        "except ImportError as error:",
        "    print(error)",
        "try:",
        "    import ray",
        "except ImportError:",
        "    print('ray stays missing')",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    message, last = done.stdout.strip().splitlines()[-2:]
    assert message.startswith("ray.tune.run: ray-based tuning needs ray") and '"ray>=1.13.0,<=2.6.3"' in message
    assert last == "ray stays missing"  # the stand-in never outlives quick_start's import


def test_missing_recbole_names_its_install_command():
    """RecBole is installed on its own (--no-deps, for its ray pin): without it, say how."""
    code = "import sys; sys.modules['recbole'] = None; import recbole_llmalign"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith("pip install --no-deps recbole==1.2.1"), done.stderr[-2000:]


def test_metrics_of_a_loaded_checkpoint_compute_without_building_a_config():
    """A checkpoint's unpickled Config never restores np.float, which RecBole's NDCG uses."""
    code = ("import recbole_llmalign, numpy as np; from recbole.evaluator.metrics import NDCG; "
            "hits = np.array([[False, True, False]]); "
            "print(float(NDCG.metric_info(None, hits, np.array([1]))[0, 2]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == pytest.approx(1 / np.log2(3))  # one hit at rank 2


def test_sequential_models_leave_anomaly_detection_off():
    importlib.import_module("recbole.model.sequential_recommender.sine")
    assert not torch.is_anomaly_enabled(), "sine.py's set_detect_anomaly(True) leaked into the process"


def test_pandas_pin_fills_empty_token_seq_cells(tmp_path):
    """pandas 3 copy-on-write turns RecBole's fillna(inplace=True) into a no-op: empty cells stay NaN."""
    from recbole.data import create_dataset

    assert int(pd.__version__.split(".")[0]) < 3
    rows = [[f"u{u}", f"i{i}", t] for u in range(1, 6) for t, i in enumerate(range(1, 6))]
    write_atomic(tmp_path / "d" / "empty" / "empty.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    write_atomic(tmp_path / "d" / "empty" / "empty.item", ["item_id:token", "genre:token_seq"],
                 [[f"i{i}", "" if i == 3 else "Comedy Drama"] for i in range(1, 6)])
    config = Config(model="Pop", dataset="empty", config_dict={
        "data_path": str(tmp_path / "d"), "state": "ERROR",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "genre"]}})
    dataset = create_dataset(config)
    genre = dataset.item_feat["genre"]
    empty_item = dataset.token2id("item_id", "i3")
    assert genre[empty_item].sum().item() == 0  # padding only, no NaN crash


def test_checkpoint_loads_back_best_resume_and_load_data_and_model(cyclic_dataset):
    """torch >= 2.6 refuses RecBole's checkpoints (they pickle the Config) without compat."""
    from recbole.data import create_dataset, data_preparation
    from recbole.quick_start import load_data_and_model

    from recbole_llmalign.quick_start import run_with_cost
    from recbole_llmalign.trainer import with_run_controls
    from recbole_llmalign.utils import get_model, get_trainer

    data_path, name = cyclic_dataset
    config_dict = cyclic_config(data_path, epochs=2)
    result, _ = run_with_cost("GRU4Rec", name, config_dict=config_dict, saved=True)
    checkpoint = next(Path("saved").glob("GRU4Rec-*.pth"))

    config, model, _, _, _, test_data = load_data_and_model(str(checkpoint))
    assert type(model).__name__ == "GRU4Rec"
    evaluator = with_run_controls(get_trainer(config["MODEL_TYPE"], "GRU4Rec"))(config, model)
    reloaded_result = evaluator.evaluate(test_data, load_best_model=False, show_progress=False)
    assert reloaded_result["ndcg@5"] == pytest.approx(result["test_result"]["ndcg@5"])  # the very weights the run tested
    from recbole_llmalign.quick_start import load_data_and_model as plugin_load

    _, reloaded, _, _, _, _ = plugin_load(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

    config = Config(model="GRU4Rec", dataset=name, config_dict=dict(config_dict, epochs=3))
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    model = get_model("GRU4Rec")(config, train_data._dataset)
    trainer = with_run_controls(get_trainer(config["MODEL_TYPE"], "GRU4Rec"))(config, model)
    trainer.resume_checkpoint(str(checkpoint))
    assert trainer.start_epoch == 2
    trainer.fit(train_data, valid_data, saved=False, show_progress=False)
    assert len(trainer.epoch_train_seconds) == 1  # resumed at epoch 2 of 3


def test_user_data_path_is_honoured_for_ml_100k(tmp_path):
    config = Config(model="Pop", dataset="ml-100k", config_dict={"data_path": str(tmp_path)})
    assert Path(config["data_path"]) == tmp_path / "ml-100k"
    default = Config(model="Pop", dataset="ml-100k")
    assert Path(default["data_path"]).resolve().parts[-2:] == ("dataset_example", "ml-100k")


def test_scoped_checkpoint_loading_leaves_torch_load_safe(tmp_path):
    """Only RecBole's own modules load pickled checkpoints; torch.load keeps weights_only=True."""
    from recbole_llmalign.safe_load import UnsafeCheckpointError

    path = tmp_path / "obj.pt"
    torch.save({"config": Path("x")}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path)
    with pytest.raises(UnsafeCheckpointError, match="pathlib"):  # a Path is outside the allowlist
        compat.load_checkpoint(path)
    assert compat.load_checkpoint(path, trust=True)["config"] == Path("x")


def test_dok_adapter_covers_every_recbole_call_of_dok_update():
    """The adapter's module list is exactly the RecBole modules that call ``._update(``."""
    import re

    root = Path(importlib.util.find_spec("recbole").origin).parent
    callers = {
        ".".join(("recbole", *path.relative_to(root).with_suffix("").parts))
        for path in root.rglob("*.py")
        if re.search(r"\b\w+\._update\(", path.read_text(encoding="utf-8"))
    }
    assert callers == set(compat.MODULES_FILLING_DOK_MATRICES)


def test_graph_models_build_their_adjacency_on_current_scipy(cyclic_dataset):
    """LightGCN (like NGCF, NCL, GCMC, SpectralCF, KGIN, MCCLK) fills a dok_matrix with
    ``_update``, which current scipy removed: the normalised adjacency must come out right."""
    import scipy.sparse
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.utils import get_model

    assert scipy.sparse.dok_matrix is not compat._DokMatrixWithUpdate  # scipy itself is left as it was
    data_path, name = cyclic_dataset
    config = Config(model="LightGCN", dataset=name, config_dict=cyclic_config(data_path))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("LightGCN")(config, train_data._dataset)

    inter = train_data._dataset.inter_matrix(form="coo").astype(np.float64)
    n_users = inter.shape[0]
    adjacency = np.zeros((n_users + inter.shape[1],) * 2)
    adjacency[inter.row, inter.col + n_users] = 1
    adjacency[inter.col + n_users, inter.row] = 1
    degree = (adjacency > 0).sum(axis=1) + 1e-7
    expected = adjacency / np.sqrt(degree)[:, None] / np.sqrt(degree)[None, :]
    assert np.allclose(model.norm_adj_matrix.to_dense().numpy(), expected, atol=1e-6)
    assert adjacency.sum() == 2 * inter.nnz > 0


def test_ksr_relation_vectors_match_the_model_dtype(recbole_tiny):
    """RecBole's KSR keeps preloaded relation vectors as float64; every forward then fails."""
    from recbole.data import create_dataset, data_preparation

    from recbole_llmalign.utils import get_model
    from tests.test_recbole_models import model_config

    config = Config(model="KSR", dataset="rbtiny", config_dict=model_config("KSR", recbole_tiny))
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("KSR")(config, train_data._dataset)
    assert model.relation_Matrix.dtype == model.entity_embedding.weight.dtype == torch.float32
    batch = next(iter(train_data))
    assert torch.isfinite(model.calculate_loss(batch))
