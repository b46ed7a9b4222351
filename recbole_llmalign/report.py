"""Comparison output: a long-form CSV, a Markdown table and a bar chart from the same records.

CSV header: ``dataset,model,setting,split,metric,value``. ``split`` is ``valid``/``test`` (and
``test_cold`` for models that report a cold-item slice) for quality metrics, ``train`` for
training cost (``sec_per_epoch``, ``epochs``, ``train_sec``, ``peak_mem_mb``) and ``test`` for
``eval_sec`` (one full-ranking pass over the test users). Metric names are RecBole's.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

CSV_HEADER = ["dataset", "model", "setting", "split", "metric", "value"]
COST_ROWS = (("train", "sec_per_epoch"), ("train", "epochs"), ("train", "best_epoch"), ("train", "train_sec"),
             ("train", "time_to_best_sec"), ("train", "peak_mem_mb"), ("test", "eval_sec"))


def long_rows(record: dict[str, Any], dataset: str) -> list[list[Any]]:
    """Long-form rows for one model's record ``{model, setting?, result, cost}``."""
    model, setting = record["model"], record.get("setting", "default")
    rows = []
    result = record["result"]
    for split, metrics in (("valid", result.get("best_valid_result")), ("test", result.get("test_result")),
                           ("test_cold", result.get("test_cold_result")), ("test_warm", result.get("test_warm_result"))):
        for metric, value in (metrics or {}).items():
            rows.append([dataset, model, setting, split, metric, float(value)])
    for split, metric in COST_ROWS:
        if metric in record["cost"]:
            rows.append([dataset, model, setting, split, metric, float(record["cost"][metric])])
    for metric, value in (record["cost"].get("extra") or {}).items():
        rows.append([dataset, model, setting, "train", metric, float(value)])
    for seconds, score in record["cost"].get("valid_curve") or []:  # split valid_curve: the valid score after `seconds` of training
        rows.append([dataset, model, setting, "valid_curve", f"score_at_{float(seconds):.1f}s", float(score)])
    return rows


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
        out.write(text)
    os.chmod(temp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
    os.replace(temp, path)


def write_csv(rows: Iterable[list[Any]], path: Path) -> None:
    lines = [",".join(CSV_HEADER)]
    for row in rows:
        *keys, value = row
        lines.append(",".join(str(k) for k in keys) + f",{value:.6g}")
    _atomic_write(path, "\n".join(lines) + "\n")


METRIC_ORDER = ("ndcg", "recall", "hit", "mrr", "auc", "gauc")


def _ordered_metrics(result: dict[str, Any]) -> list[str]:
    """Metrics shown in tables, NDCG first (the usual valid metric), precision left out."""
    known = [m for m in result if m.split("@")[0] in METRIC_ORDER]
    return sorted(known, key=lambda m: (METRIC_ORDER.index(m.split("@")[0]), m))


def markdown_table(records: list[dict[str, Any]], metrics: list[str] | None = None) -> str:
    """One row per model: valid/test metrics, cost, and cost ratio to the first model."""
    first_test = records[0]["result"]["test_result"] or {}
    metrics = metrics or _ordered_metrics(first_test)
    base_epoch = records[0]["cost"].get("sec_per_epoch") or float("nan")
    header = (["model", "setting", f"valid {metrics[0]}"] + [f"test {m}" for m in metrics]
              + ["s/epoch", f"s/epoch vs {records[0]['model']}", "epochs (best)", "s to best", "eval s", "peak MB"])
    cold_metrics = metrics[:2] if any(r["result"].get("test_cold_result") for r in records) else []
    header[3 + len(metrics):3 + len(metrics)] = [f"cold {m}" for m in cold_metrics] + (["cold users"] if cold_metrics else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        valid = record["result"].get("best_valid_result") or {}
        test = record["result"].get("test_result") or {}
        cold = record["result"].get("test_cold_result") or {}
        cost = record["cost"]
        cells = [record["model"], record.get("setting", "default"), f"{valid.get(metrics[0], float('nan')):.4f}"]
        cells += [f"{test.get(m, float('nan')):.4f}" for m in metrics]
        if cold_metrics:
            cells += [f"{cold.get(m, float('nan')):.4f}" for m in cold_metrics] + [f"{cold.get('n_users', 0):.0f}"]
        cells += [f"{cost['sec_per_epoch']:.1f}", f"{cost['sec_per_epoch'] / base_epoch:.2f}x",
                  f"{cost['epochs']} ({cost.get('best_epoch', 0)})", f"{cost.get('time_to_best_sec', 0.0):.0f}",
                  f"{cost['eval_sec']:.1f}", f"{cost['peak_mem_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test metrics (left) and seconds per epoch (right), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = _ordered_metrics(records[0]["result"]["test_result"] or {})
    labels = [r["model"] if r.get("setting", "default") == "default" else f"{r['model']}\n{r['setting']}" for r in records]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(records), 1)
    positions = np.arange(len(metrics))
    for index, record in enumerate(records):
        values = [record["result"]["test_result"].get(m, 0.0) for m in metrics]
        quality.bar(positions + index * width, values, width, label=labels[index])
    quality.set_xticks(positions + width * (len(records) - 1) / 2, metrics)
    quality.set_ylabel("test value")
    quality.legend(fontsize=8)
    quality.set_title(title)
    cost.bar(labels, [r["cost"]["sec_per_epoch"] for r in records], color="gray")
    cost.set_ylabel("seconds per training epoch")
    cost.tick_params(axis="x", labelrotation=45, labelsize=8)
    save_figure(figure, path)


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Lay out, write to a temporary file, close, and move into place (readable by others)."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temp, dpi=dpi)
    plt.close(figure)
    os.chmod(temp, 0o644)
    os.replace(temp, path)


def write_text(path: Path, text: str) -> None:
    """A results file written atomically (a reader never sees half a table)."""
    _atomic_write(path, text)


def write_comparison(records: list[dict[str, Any]], dataset: str, output_dir: Path, name: str,
                     preface: str = "") -> None:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.png`` under ``output_dir``."""
    output_dir = Path(output_dir)
    write_csv([row for r in records for row in long_rows(r, dataset)], output_dir / f"{name}.csv")
    text = f"# {name}\n\n{preface}{markdown_table(records)}"
    _atomic_write(output_dir / f"{name}.md", text)
    bar_chart(records, output_dir / f"{name}.png", f"{dataset}: test metrics")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def records_from_csv(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(dataset, records) rebuilt from a long-form CSV, in first-appearance order, for re-rendering tables."""
    cost_metrics = {metric for _, metric in COST_ROWS}
    split_keys = {"valid": "best_valid_result", "test": "test_result", "test_cold": "test_cold_result",
                  "test_warm": "test_warm_result"}
    records: dict[tuple[str, str], dict[str, Any]] = {}
    dataset = ""
    for row in read_csv(path):
        dataset = row["dataset"]
        record = records.setdefault((row["model"], row["setting"]), {
            "model": row["model"], "setting": row["setting"], "result": {}, "cost": {"extra": {}}})
        value = float(row["value"])
        if row["split"] == "valid_curve":
            seconds = float(row["metric"].removeprefix("score_at_").removesuffix("s"))
            record["cost"].setdefault("valid_curve", []).append((seconds, value))
            continue
        if row["metric"] in cost_metrics and row["split"] in ("train", "test") and (row["split"], row["metric"]) in COST_ROWS:
            record["cost"][row["metric"]] = int(value) if row["metric"] in ("epochs", "best_epoch") else value
        elif row["split"] == "train":
            record["cost"]["extra"][row["metric"]] = value
        else:
            record["result"].setdefault(split_keys[row["split"]], {})[row["metric"]] = value
    return dataset, list(records.values())
