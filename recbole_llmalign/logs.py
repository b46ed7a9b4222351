"""Quiet, useful logs: the one place that filters other packages' warnings, and the run summary.

Third-party warnings. RecBole 1.2.1, transformers, peft and ray warn about their own calls into
pandas, torch, setuptools and transformers: nothing a user of the plugin can act on, printed
several times per run. :func:`quiet_third_party_warnings` hides exactly those, each matched by
category, message and the module the warning is attributed to (``THIRD_PARTY_WARNINGS`` lists
them with the reason), plus transformers' LOAD REPORT when its only entries are the decoder
layers ``llm_layers`` leaves out (the plugin logs the cut itself). A warning raised by the user's
own code, or any other warning, is never touched. The entry points call it: the command line,
``run_with_cost`` (so every run, ``compare`` worker and tuning trial) and ``compare``; importing
the package filters only while it imports RecBole (ray's warning fires then). Switch it off with
``quiet_third_party_warnings: False`` (``properties/overall.yaml``, ``--quiet_third_party_warnings=False``)
or, for everything including import time, the environment variable
``RECBOLE_LLMALIGN_THIRD_PARTY_WARNINGS=show``.

Run summary. :func:`format_run_summary` renders the end of every run as a short table: valid and
test metrics, the cold/warm test slices when present, the frozen backbone's test metrics on the
same test data for models that have one (:func:`evaluate_backbone`), time and peak memory, and a
last line with the headline metric (test NDCG@10) of the model, of its backbone and their ratio.

This module imports only the standard library, so the package can use it while it imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SHOW_ENV = "RECBOLE_LLMALIGN_THIRD_PARTY_WARNINGS"  # "show" (or 1/true/yes) turns every filter here off


@dataclass(frozen=True)
class WarningRule:
    """One third-party warning to hide: ``category`` raised with a message matching ``message``,
    attributed (by its stack level) to a module whose name matches ``module``."""

    category: type[Warning]
    module: str
    message: str
    why: str


THIRD_PARTY_WARNINGS: tuple[WarningRule, ...] = (
    WarningRule(FutureWarning, r"recbole\.", "",
                "RecBole 1.2.1 never raises FutureWarning itself: these are pandas (fillna(inplace=True) on a column, "
                "Series.agg(len)), numpy and torch (torch.cuda.amp.GradScaler) deprecations hit by RecBole's own "
                "calls; the pins and compat.py handle what they break."),
    WarningRule(UserWarning, r"recbole\.", r"torch\.sparse\.SparseTensor\(indices, values, shape",
                "torch deprecated the sparse constructor RecBole's graph models (LightGCN, NGCF, ...) build their "
                "adjacency with; it still works."),
    WarningRule(FutureWarning, r"(torch\.nn\.modules\.module|transformers\.)", r"`past_key_values` is deprecated",
                "transformers 5 renamed the cache argument the plugin's LLM models pass (attributed to torch's "
                "Module.__call__); the old name works until transformers 5.40."),
    WarningRule(FutureWarning, r"transformers\.", r"`is_gradient_checkpointing` is deprecated",
                "peft reads the old attribute name when it wraps a transformers 5 model for LoRA."),
    WarningRule(UserWarning, r"ray\.", r"pkg_resources is deprecated",
                "ray 2.6.3 imports setuptools' pkg_resources; the `ray` extra pins setuptools<81, where it still exists."),
    WarningRule(SyntaxWarning, r"(<unknown>$|.*[/\\]recbole[/\\])", r"invalid escape sequence",  # a compile warning names a path
                "Python 3.12+ warns while compiling RecBole 1.2.1's sources, whose docstrings hold LaTeX such as "
                "\\prime (dien.py), the first time they are imported without a bytecode cache."),
)

# transformers loggers that write the LOAD REPORT table after from_pretrained.
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.modeling_layers")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CutLayersLoadReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT when every entry is an UNEXPECTED ``model.layers.*`` key.

    Those are the checkpoint's decoder layers beyond ``llm_layers``, which the plugin leaves out on
    purpose (and logs as "LLM ...: 8/30 layers"). A report with any other entry (a MISSING or
    mismatched key, any non-layer key) is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines()
                if "|" in line and not set(line) <= set("-+| ")]
        entries = [row for row in rows[1:] if len(row) >= 2]  # rows[0] is the header (Key | Status)
        cut_layers_only = bool(entries) and all(
            status == "UNEXPECTED" and re.match(r"(model\.)?layers\.", key) for key, status, *_ in entries)
        return not cut_layers_only


_LOAD_REPORT_FILTER = CutLayersLoadReportFilter()
_installed: list[tuple] = []  # the warnings.filters entries added here, so they can be taken out again


def third_party_warnings_shown() -> bool:
    """True when ``RECBOLE_LLMALIGN_THIRD_PARTY_WARNINGS`` asks to see every warning."""
    return os.environ.get(SHOW_ENV, "").strip().lower() in ("show", "1", "true", "yes")


def quiet_third_party_warnings(enabled: bool = True) -> bool:
    """Hide the warnings in ``THIRD_PARTY_WARNINGS`` and the cut-layers LOAD REPORT (``enabled``),
    or take those filters out again (``enabled=False``). Idempotent; returns whether they are on.

    The environment variable ``RECBOLE_LLMALIGN_THIRD_PARTY_WARNINGS=show`` wins over ``enabled``.
    """
    enabled = bool(enabled) and not third_party_warnings_shown()
    for entry in _installed:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    _installed.clear()
    for name in LOAD_REPORT_LOGGERS:
        logging.getLogger(name).removeFilter(_LOAD_REPORT_FILTER)
    if enabled:
        for rule in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=rule.message, category=rule.category, module=rule.module)
            _installed.append(warnings.filters[0])
        for name in LOAD_REPORT_LOGGERS:
            logging.getLogger(name).addFilter(_LOAD_REPORT_FILTER)
    getattr(warnings, "_filters_mutated", lambda: None)()  # a warning seen while filtered may show once it is off
    return enabled


@contextlib.contextmanager
def third_party_warnings_quieted() -> Iterator[None]:
    """The filters of :func:`quiet_third_party_warnings` for the duration of a block only (the
    package's import of RecBole); the caller's warning filters are restored afterwards."""
    with warnings.catch_warnings():
        if not third_party_warnings_shown():
            for rule in THIRD_PARTY_WARNINGS:
                warnings.filterwarnings("ignore", message=rule.message, category=rule.category, module=rule.module)
        yield


# ---- run summary ----
def headline_metric(test_result: Mapping[str, Any], valid_metric: str | None = None) -> str | None:
    """The metric the summary's last line compares: ``ndcg@10`` when the run has it, else the
    run's ``valid_metric``, else its first test metric."""
    if not test_result:
        return None
    if "ndcg@10" in test_result:
        return "ndcg@10"
    if valid_metric and valid_metric.lower() in test_result:
        return valid_metric.lower()
    return next(iter(test_result))


def evaluate_backbone(trainer: Any, model: Any, test_data: Any) -> dict[str, float] | None:
    """Test metrics of the frozen backbone of a model that has one (``backbone_model``), or None.

    The model holds the backbone it ranks with in evaluation (``model.scoring_backbone``, frozen:
    the one it trained on, its refit, or under ``cross_fit_evaluation: folds`` the fold backbones routed
    by user), so the backbone is scored on the very test loader,
    evaluator and protocol of the run: the trainer evaluates it in the model's place, then gets the
    model back. One extra full-ranking pass of the small backbone, no LLM.
    """
    backbone = getattr(model, "scoring_backbone", None)
    if getattr(type(model), "backbone_model", None) is None or backbone is None:
        return None
    own = trainer.model
    trainer.model = backbone
    try:
        return dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False))
    finally:
        trainer.model = own


def _row(label: str, metrics: Mapping[str, Any], columns: list[str], width: int) -> str:
    cells = [f"{float(metrics[c]):>{max(len(c), 7)}.4f}" if c in metrics else f"{'-':>{max(len(c), 7)}}" for c in columns]
    return f"{label:<{width}}  " + "  ".join(cells)


def format_run_summary(model: str, dataset: str, result: Mapping[str, Any], cost: Mapping[str, Any],
                       total_sec: float, backbone_model: str | None = None, valid_metric: str | None = None,
                       memory: str = "RSS") -> str:
    """The run's summary table (see the module docstring); ``cost`` is ``asdict(RunCost)``.

    The last line always names the headline test metric; with a backbone result it also gives the
    backbone's value and the ratio model / backbone.
    """
    test = result.get("test_result") or {}
    columns = [m for m in test if m != "n_users"]
    rows: list[tuple[str, Mapping[str, Any]]] = [("valid (best)", result.get("best_valid_result") or {}), ("test", test)]
    for key, name in (("test_cold_result", "test, cold items"), ("test_new_result", "test, new items"),
                      ("test_warm_result", "test, warm items")):
        if result.get(key):
            rows.append((f"{name} ({float(result[key].get('n_users', 0)):.0f} users)", result[key]))
    backbone = result.get("backbone_test_result")
    if backbone:
        rows.append((f"test, backbone {backbone_model or ''}".rstrip(), backbone))
    width = max(len(label) for label, _ in rows)
    lines = [f"Run summary: {model} on {dataset}",
             f"{'':<{width}}  " + "  ".join(f"{c:>{max(len(c), 7)}}" for c in columns)]
    lines += [_row(label, metrics, columns, width) for label, metrics in rows]
    epochs = int(cost.get("epochs", 0))
    lines.append(f"time {total_sec:.1f} s in all (training {float(cost.get('train_sec', 0.0)):.1f} s, {epochs} epoch"
                 f"{'' if epochs == 1 else 's'}, best valid after {int(cost.get('best_epoch', 0))}; test evaluation "
                 f"{float(cost.get('eval_sec', 0.0)):.1f} s); peak memory {float(cost.get('peak_mem_mb', 0.0)):.0f} MB ({memory})")
    metric = headline_metric(test, valid_metric)
    if metric is not None:
        last = f"{model} test {metric} {float(test[metric]):.4f}"
        if backbone and metric in backbone:
            ratio = float(test[metric]) / float(backbone[metric]) if float(backbone[metric]) else float("nan")
            name = f"backbone {backbone_model}" if backbone_model else "backbone"
            last += f"; {name} {float(backbone[metric]):.4f}; ratio {ratio:.3f}x"
        lines.append(last)
    return "\n".join(lines)


def log_run_summary(config: Any, result: Mapping[str, Any], cost: Mapping[str, Any], total_sec: float,
                    backbone_model: str | None = None) -> str:
    """Log :func:`format_run_summary` for a finished run through RecBole's logger (so the log file has
    it too); its headline line is a record of its own, the run's last."""
    device = config["device"]
    memory = "CUDA allocated" if getattr(device, "type", str(device)) == "cuda" else "RSS"
    text = format_run_summary(config["model"], config["dataset"], result, cost, total_sec, backbone_model,
                              config["valid_metric"], memory)
    *table, last = text.splitlines()
    logger = logging.getLogger()
    logger.info("\n".join(table))
    logger.info(last)
    return text
