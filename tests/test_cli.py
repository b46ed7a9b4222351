"""The command line: a known error is one ``error: ...`` line and exit code 2, ``--debug`` shows the
traceback, and a RecBole key of the wrong type stops before any training with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recbole_llmalign import cli
from recbole_llmalign.config import Config, ConfigError
from tests.conftest import cyclic_config

SCRIPT = Path(__file__).resolve().parents[1] / "run_recbole_llmalign.py"


def _run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    environment.update(env or {}, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=environment)


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """cli.main in this process; RecBole's Config reads --key=value from sys.argv, so set it too."""
    monkeypatch.setattr(sys, "argv", ["run_recbole_llmalign.py", *args])
    return cli.main(list(args))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_known_error_is_one_line_and_exit_code_2():
    done = _run_script("--model=SASRecc", "--dataset=ml-100k")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(_error_lines(done.stderr)) == 1
    assert _error_lines(done.stderr)[0].startswith("error: Unknown model 'SASRecc'. Did you mean SASRec")


def test_debug_flag_shows_the_traceback():
    done = _run_script("--model=SASRecc", "--dataset=ml-100k", "--debug")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: Unknown model 'SASRecc'" in done.stderr
    assert not _error_lines(done.stderr)


def test_debug_environment_variable_reraises(monkeypatch, cyclic_dataset):
    data_path, name = cyclic_dataset
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="Unknown dataset 'nowhere'"):
        _main(monkeypatch, "--model=Pop", "--dataset=nowhere", f"--data_path={data_path}")
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert _main(monkeypatch, "--model=Pop", "--dataset=nowhere", f"--data_path={data_path}") == 2


def test_missing_dataset_is_a_known_error(monkeypatch, capsys, cyclic_dataset):
    data_path, _ = cyclic_dataset
    assert _main(monkeypatch, "--model=Pop", "--dataset=nowhere", f"--data_path={data_path}") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: Unknown dataset 'nowhere'") and "--data_path" in line


def test_recbole_key_of_wrong_type_stops_before_training(monkeypatch, capsys, cyclic_dataset):
    """``--epochs=abc`` used to end in a TypeError inside RecBole's trainer, after loading the data."""
    data_path, name = cyclic_dataset
    assert _main(monkeypatch, "--model=Pop", f"--dataset={name}", f"--data_path={data_path}", "--epochs=abc") == 2
    err = capsys.readouterr().err
    assert ("error: Config key 'epochs' must be an integer (default 300, documented in "
            "recbole/properties/overall.yaml), got 'abc' (str).") in err
    assert not Path("log").exists() and not Path("saved").exists()  # no logger, no trainer yet


def test_recbole_config_check_is_a_known_error(monkeypatch, capsys, cyclic_dataset):
    """RecBole's own checks raise NotImplementedError/TypeError; they arrive as one clean line."""
    data_path, name = cyclic_dataset
    assert _main(monkeypatch, "--model=Pop", f"--dataset={name}", f"--data_path={data_path}",
                 "--metrics=['Recal']") == 2
    assert _error_lines(capsys.readouterr().err) == ["error: There is no metric named 'Recal'"]


def test_other_errors_keep_their_traceback(monkeypatch):
    """A bug is not a known error: it is not turned into a one-liner."""
    import recbole_llmalign.quick_start as quick_start

    def crash(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(quick_start, "run_recbole_llmalign", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        _main(monkeypatch, "--model=Pop")


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "abc", "an integer"),
    ("train_batch_size", 2.5, "an integer"),
    ("learning_rate", "fast", "a number"),
    ("shuffle", "yes", "true or false"),
    ("checkpoint_dir", ["saved"], "a string"),
    ("eval_args", "LS", "a mapping"),
    ("topk", "ten", "a list or an integer"),
])
def test_recbole_key_types_are_checked_against_recbole_defaults(cyclic_dataset, key, value, expected):
    data_path, name = cyclic_dataset
    with pytest.raises(ConfigError, match=rf"(?s)'{key}' must be {expected} \(default .*"
                                          rf"recbole/properties/overall.yaml\).*Fix it"):
        Config(model="Pop", dataset=name, config_dict=cyclic_config(data_path, **{key: value}))


def test_recbole_model_key_names_the_model_yaml(cyclic_dataset):
    data_path, name = cyclic_dataset
    with pytest.raises(ConfigError, match=r"'n_layers' must be an integer .*recbole/properties/model/SASRec.yaml"):
        Config(model="SASRec", dataset=name, config_dict=cyclic_config(data_path, n_layers="two"))


@pytest.mark.parametrize("key, value", [
    ("metrics", "Recall"),  # RecBole wraps one metric in a list
    ("topk", 5),
    ("gpu_id", 0),  # what RecBole's command line makes of --gpu_id=0
    ("learning_rate", 1),
])
def test_values_recbole_accepts_pass_the_check(cyclic_dataset, key, value):
    data_path, name = cyclic_dataset
    config = Config(model="Pop", dataset=name, config_dict=cyclic_config(data_path, **{key: value}))
    assert config[key] == {"metrics": [value], "topk": [value], "gpu_id": str(value)}.get(key, value)


def test_a_path_object_passes_for_a_string_key(cyclic_dataset):
    data_path, name = cyclic_dataset
    config = Config(model="Pop", dataset=name, config_dict=cyclic_config(Path(data_path)))
    assert Path(config["data_path"]) == Path(data_path) / name
