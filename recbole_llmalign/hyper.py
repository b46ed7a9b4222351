"""Hyperparameter tuning of plugin and RecBole models with RecBole's own ``HyperTuning``.

RecBole's ``objective_function`` builds RecBole's Config and looks the model up in RecBole's
registry, so ``AlignSASRec`` is unknown to it and the plugin's properties, datasets and automatic
backbone never apply. :func:`objective_function` has its signature and return dict and runs each
trial through :func:`recbole_llmalign.quick_start.run_with_cost`, so every model the plugin runs
can be tuned, exactly as ``run_recbole_llmalign`` would train it::

    from recbole.trainer import HyperTuning
    from recbole_llmalign.quick_start import objective_function

    hp = HyperTuning(objective_function, params_file="hyper.test", fixed_config_file_list=["my.yaml"], algo="bayes")
    hp.run()

:func:`hyper_tune` is that, plus the result file, as RecBole's ``run_hyper.py`` does it (the
``hyper`` command of the CLI), and a grid search (``algo="exhaustive"``) that works on today's
hyperopt, where RecBole 1.2.1's own fails (:func:`exhaustive_search`). RecBole's HyperTuning runs on hyperopt, an optional extra here
(``pip install "recbole-llmalign[hyper]"``). Ray-based tuning is not offered: RecBole 1.2.1
reports to ray with the ray<=2.6.3 API, which installs on Python 3.11 only.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from recbole_llmalign.config import Config
from recbole_llmalign.io import atomic_write_with

ALGOS = ("exhaustive", "random", "bayes")  # RecBole's HyperTuning: grid, hyperopt's rand and tpe


def require_hyperopt() -> None:
    """Raise an ImportError that says what to install when hyperopt is missing."""
    if importlib.util.find_spec("hyperopt") is None:
        raise ImportError(
            "Hyperparameter tuning runs on RecBole's HyperTuning, which needs hyperopt, not installed: "
            'run `pip install hyperopt` (or `pip install "recbole-llmalign[hyper]"`).'
        )


def exhaustive_search(new_ids: list[int], domain: Any, trials: Any, seed: int, max_repeats: int = 1000) -> list[Any]:
    """RecBole's grid search as a hyperopt algorithm, on the random Generator hyperopt >= 0.2.7 samples with.

    Like RecBole's ``exhaustive_search``, it draws settings of the ``choice`` parameters and keeps
    only combinations no earlier trial had (after ``max_repeats`` repeats in a row the grid is
    taken as done). RecBole 1.2.1's draws with ``np.random.RandomState``, which today's hyperopt
    samplers refuse (``'RandomState' object has no attribute 'integers'``).
    """
    import numpy as np
    from hyperopt import pyll
    from hyperopt.base import miscs_update_idxs_vals

    def combination(vals: dict[str, list[Any]]) -> frozenset:
        return frozenset((key, value[0] if len(value) else None) for key, value in vals.items())

    seen = {combination(trial["misc"]["vals"]) for trial in trials.trials}
    rng = np.random.default_rng(seed)
    docs = []
    for new_id in new_ids:
        for _ in range(max_repeats + 1):
            idxs, vals = pyll.rec_eval(domain.s_idxs_vals, memo={domain.s_new_ids: [new_id], domain.s_rng: rng})
            if combination(vals) not in seen:
                break
        else:
            return docs
        seen.add(combination(vals))
        misc = {"tid": new_id, "cmd": domain.cmd, "workdir": domain.workdir}
        miscs_update_idxs_vals([misc], idxs, vals)
        docs.extend(trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc]))
    return docs


def objective_function(config_dict: dict[str, Any] | None = None, config_file_list: list[str] | None = None,
                       saved: bool = True) -> dict[str, Any]:
    """RecBole 1.2.1's ``objective_function`` for plugin and RecBole models alike.

    Trains and evaluates one setting (``config_dict`` over ``config_file_list``; the model and
    dataset come from either, as in RecBole) and returns RecBole's dict: ``model``,
    ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``, ``test_result``. As in
    RecBole, the previous trial's log handlers are removed first, so each trial writes its own log.
    """
    from recbole_llmalign.quick_start import run_with_cost

    model = Config(config_dict=config_dict, config_file_list=config_file_list)["model"]  # a clear error before any work
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    result, _ = run_with_cost(model, None, config_file_list, dict(config_dict or {}), saved)
    return {"model": model, **{key: result[key] for key in
                               ("best_valid_score", "valid_score_bigger", "best_valid_result", "test_result")}}


def hyper_tune(params_file: str | None = None, config_file_list: list[str] | None = None,
               output_file: str | Path = "hyper_example.result", algo: str = "exhaustive", max_evals: int = 100,
               early_stop: int = 10, display_file: str | None = None,
               params_dict: dict[str, Any] | None = None) -> Any:
    """Search ``params_file`` (RecBole's format: ``learning_rate choice [0.01,0.001]``, also
    ``uniform``, ``quniform``, ``loguniform``) or ``params_dict`` with RecBole's HyperTuning and
    write every trial's valid and test results to ``output_file`` (atomically).

    ``algo``: ``exhaustive`` tries every combination of ``choice`` parameters (``max_evals`` is
    then the grid size), ``random`` and ``bayes`` (TPE) draw ``max_evals`` settings. The search
    stops after ``early_stop`` trials without a better valid score. Returns the HyperTuning
    object: ``best_params``, ``best_score``, ``params2result``.
    """
    if algo not in ALGOS:
        raise ValueError(f"Unknown algo '{algo}': choose one of {', '.join(ALGOS)} (RecBole's HyperTuning).")
    if params_file is None and params_dict is None:
        raise ValueError("Tuning needs a search space: pass --params_file=<file> (lines like `learning_rate choice [0.01,0.001]`).")
    if params_file is not None and not Path(params_file).is_file():
        raise FileNotFoundError(f"params_file {params_file} does not exist.")
    for file in config_file_list or []:
        if not Path(file).is_file():
            raise FileNotFoundError(f"Config file {file} does not exist.")
    require_hyperopt()
    from recbole.trainer import HyperTuning

    tuner = HyperTuning(objective_function, params_file=params_file, params_dict=params_dict,
                        fixed_config_file_list=config_file_list, display_file=display_file, algo=algo,
                        max_evals=max_evals, early_stop=early_stop)  # "exhaustive" sets max_evals to the grid size
    if algo == "exhaustive":
        tuner.algo = exhaustive_search  # RecBole's own fails on today's hyperopt (see exhaustive_search)
    tuner.run()
    atomic_write_with(output_file, lambda temp: tuner.export_result(output_file=temp))
    return tuner


def best_result(tuner: Any) -> dict[str, Any]:
    """The best trial's RecBole result dict (HyperTuning keeps it under the parameters' string)."""
    return tuner.params2result[tuner.params2str(tuner.best_params)]
