"""Comparison output: a long-form CSV, a Markdown table and a bar chart from the same records.

CSV header: ``dataset,model,setting,split,metric,value``. ``split`` is ``valid``/``test`` (and
``test_cold`` / ``test_new`` for the cold-item and new-item slices, ``test_backbone`` for the own frozen
backbone of an LLM model on the same test users, ``test_backbone_cold`` / ``test_backbone_new`` for it on
those slices) for quality metrics, ``train``
for training cost (``sec_per_epoch``, ``epochs``, ``train_sec``, ``peak_mem_mb``,
``train_time_budget`` (0 = none), ``seed``, ``cpu_threads``: torch's threads, absent in files from before it
was recorded) and ``test`` for ``eval_sec`` (one full-ranking pass
over the test users). Metric names are RecBole's.

Why training ended is three ``train`` rows, ``stopped_by_early_stop``, ``stopped_by_budget`` and
``stopped_by_epochs``, worth 1 for the reason that applied and 0 for the others (so their mean over
seeds is the share of seeds that stopped that way); tables show the reason as a word.

Several seeds (``compare(..., seeds=[...])``): a run's rows carry ``setting`` =
``<setting>/seed_<N>`` (``default/seed_2020``, ``id_only/seed_2020``); aggregate rows over the seeds
have ``setting`` = ``mean`` and ``std`` (sample standard deviation) for the default and
``<setting>/mean``, ``<setting>/std`` for a named variant. With a reference model, a paired
bootstrap over test users of the NDCG@10 difference to it, pooled over seeds, adds the rows
``ndcg@10_diff`` (the mean difference), ``ndcg@10_diff_lo`` and ``ndcg@10_diff_hi`` (95% percentile
interval; users resampled, each with their pairs from every seed: ``paired_bootstrap``)
under the ``mean`` setting of each model (under its own setting when there are no seeds), for the
splits ``test``, ``test_cold`` and ``test_new``.

Several references (``reference="SASRec,AlignSASRec"`` or a list, each ``Model`` or ``Model:setting``):
the first is the primary one and its rows keep the names above, so readers of one-reference files
need no change; every further reference ``<R>`` adds the same rows, with the same settings and
splits, named ``ndcg@10_diff_vs_<R>``, ``ndcg@10_diff_lo_vs_<R>`` and ``ndcg@10_diff_hi_vs_<R>``
(``<R>`` as given, e.g. ``AlignSASRec:id_only``); the reference's own model has none of its rows.
Readers tell all these rows from model metrics with ``is_diff_metric``. One more row, metric
``primary_reference`` (value 1, split ``test``, under the primary reference's ``mean`` setting, or its
own without seeds), names the reference the unmarked rows are against.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from recbole_llmalign.io import atomic_write_text, atomic_write_with

CSV_HEADER = ["dataset", "model", "setting", "split", "metric", "value"]
COST_ROWS = (("train", "sec_per_epoch"), ("train", "epochs"), ("train", "best_epoch"), ("train", "train_sec"),
             ("train", "time_to_best_sec"), ("train", "peak_mem_mb"), ("test", "eval_sec"),
             ("train", "train_time_budget"), ("train", "seed"), ("train", "cpu_threads"))
INTEGER_COSTS = ("epochs", "best_epoch", "seed", "cpu_threads")
STOP_REASONS = ("early_stop", "budget", "epochs")  # RecBole's stopping_step, train_time_budget, the last epoch
RESULT_SPLITS = (("valid", "best_valid_result"), ("test", "test_result"), ("test_cold", "test_cold_result"),
                 ("test_new", "test_new_result"), ("test_warm", "test_warm_result"),
                 ("test_backbone", "backbone_test_result"),  # a frozen-backbone model's own backbone, same test users,
                 ("test_backbone_cold", "backbone_test_cold_result"),  # and on the same slices
                 ("test_backbone_new", "backbone_test_new_result"))
BACKBONE_SLICES = (("test_cold_result", "backbone_test_cold_result", "cold"), ("test_new_result", "backbone_test_new_result", "new"))
AGGREGATES = ("mean", "std")
# a row (split test, value 1) naming the primary reference of a file's bootstrap rows, under its aggregate (or own)
# setting, so a resumed comparison knows what the earlier primary rows were measured against
PRIMARY_REFERENCE_METRIC = "primary_reference"
DIFF_SUFFIXES = ("_diff", "_diff_lo", "_diff_hi")
SIGNIFICANCE_SPLITS = ("test", "test_cold", "test_new")
SEEDS_SUFFIX = "_diff_seeds"  # how many seeds a bootstrap row pooled: per-user files may be missing for some (another machine)
_DIFF_METRIC = re.compile(r"(.+?)(_diff(?:_lo|_hi|_seeds)?)(?:_vs_(.+))?")  # the first "_diff" ends the metric: R may hold one


def parse_references(reference: str | Iterable[str] | None) -> list[str]:
    """The references of a comparison, primary first: a comma list or a list of ``Model[:setting]``, repeats dropped."""
    if not reference:
        return []
    entries = [reference] if isinstance(reference, str) else list(reference)
    return list(dict.fromkeys(part.strip() for entry in entries for part in entry.split(",") if part.strip()))


def split_diff_metric(metric: str) -> tuple[str, str, str | None] | None:
    """``(metric, suffix, reference)`` of a bootstrap row's metric (reference None for the primary one), else None.

    ``ndcg@10_diff_lo`` -> ``("ndcg@10", "_diff_lo", None)``; ``ndcg@10_diff_vs_X:s`` -> ``("ndcg@10", "_diff", "X:s")``.
    """
    found = _DIFF_METRIC.fullmatch(metric)
    return (found.group(1), found.group(2), found.group(3)) if found else None


def is_diff_metric(metric: str) -> bool:
    """Whether a CSV metric is a bootstrap row (against any reference) rather than a model's own metric."""
    return split_diff_metric(metric) is not None


def setting_label(setting: str, kind: str | None) -> str:
    """The CSV ``setting`` of a run (``kind`` None, or ``seed_<N>``) or an aggregate (``mean``/``std``)."""
    if kind is None:
        return setting
    if kind in AGGREGATES and setting == "default":
        return kind
    return f"{setting}/{kind}"


def parse_setting_label(label: str) -> tuple[str, str | None]:
    """``(setting, kind)`` back from a CSV ``setting``: kind is None, ``seed_<N>``, ``mean`` or ``std``."""
    if label in AGGREGATES:
        return "default", label
    head, sep, tail = label.rpartition("/")
    if sep and (tail in AGGREGATES or re.fullmatch(r"seed_\d+", tail)):
        return head, tail
    return label, None


def record_seed(record: dict[str, Any]) -> int | None:
    """The seed a record ran with (its ``seed``, else the one in its cost)."""
    seed = record.get("seed")
    if seed is None and record.get("cost", {}).get("seed") is not None:
        seed = int(record["cost"]["seed"])
    return seed


def budget_cell(cost: dict[str, Any]) -> str:
    """The row's ``train_time_budget`` in seconds, or ``none``."""
    budget = cost.get("train_time_budget") or 0.0
    return f"{budget:.0f}" if budget else "none"


def stop_cell(cost: dict[str, Any]) -> str:
    """``early_stop`` / ``epochs`` / ``budget (600 s)``; ``-`` when not recorded."""
    reason = cost.get("stopped_by") or "-"
    budget = cost.get("train_time_budget") or 0.0
    return f"{reason} ({budget:.0f} s)" if reason == "budget" else reason


def threads_cell(costs: Iterable[dict[str, Any]]) -> str:
    """The CPU thread counts some runs trained with (``2``, ``1, 2``), ``-`` for runs from before they were recorded."""
    counts = [f"{cost['cpu_threads']:.0f}" if cost.get("cpu_threads") else "-" for cost in costs]
    return ", ".join(dict.fromkeys(counts))


def threads_differ(costs: Iterable[dict[str, Any]]) -> bool:
    """Whether a table needs a ``threads`` column: its runs' thread counts are not one recorded value for all
    (its s/epoch column compares runs only at equal counts); files from before the count was recorded get none."""
    counts = {cost.get("cpu_threads") or None for cost in costs}
    return len(counts) > 1


def long_rows(record: dict[str, Any], dataset: str) -> list[list[Any]]:
    """Long-form rows for one model's record ``{model, setting?, seed?, result, cost}`` (``seed`` set: one run of several)."""
    model = record["model"]
    seed = record.get("seed")
    setting = setting_label(record.get("setting", "default"), None if seed is None else f"seed_{seed}")
    rows = []
    result = record["result"]
    for split, key in RESULT_SPLITS:
        for metric, value in (result.get(key) or {}).items():
            rows.append([dataset, model, setting, split, metric, float(value)])
    for split, metric in COST_ROWS:
        if metric in record["cost"]:
            rows.append([dataset, model, setting, split, metric, float(record["cost"][metric] or 0.0)])
    if record["cost"].get("stopped_by"):
        for reason in STOP_REASONS:
            rows.append([dataset, model, setting, "train", f"stopped_by_{reason}", float(record["cost"]["stopped_by"] == reason)])
    for metric, value in (record["cost"].get("extra") or {}).items():
        rows.append([dataset, model, setting, "train", metric, float(value)])
    for seconds, score in record["cost"].get("valid_curve") or []:  # split valid_curve: the valid score after `seconds` of training
        rows.append([dataset, model, setting, "valid_curve", f"score_at_{float(seconds):.1f}s", float(score)])
    return rows


def reproduces(new: dict[str, Any], earlier: dict[str, Any]) -> bool:
    """Whether a run trained again gave every valid and test metric of its earlier record, to the results file's
    precision (6 significant digits, as ``write_csv`` writes them).

    Why: per-user metrics are not in git, so a fresh machine retrains a run only to recreate them; a
    deterministic rerun (same code, config, seed and thread count) that reproduces the file describes the
    same model, and the bootstrap rows measured on the earlier run still hold for it.
    """
    compared = 0
    for _, key in RESULT_SPLITS:
        after = new["result"].get(key) or {}
        for metric, value in (earlier["result"].get(key) or {}).items():
            if metric not in after or float(f"{float(after[metric]):.6g}") != float(f"{float(value):.6g}"):
                return False
            compared += 1
    return compared > 0


def write_csv(rows: Iterable[list[Any]], path: Path) -> None:
    lines = [",".join(CSV_HEADER)]
    for row in rows:
        *keys, value = row
        lines.append(",".join(str(k) for k in keys) + f",{value:.6g}")
    atomic_write_text(path, "\n".join(lines) + "\n")


METRIC_ORDER = ("ndcg", "recall", "hit", "mrr", "auc", "gauc")


def _ordered_metrics(result: dict[str, Any]) -> list[str]:
    """Metrics shown in tables, NDCG first (the usual valid metric), precision left out."""
    known = [m for m in result if m.split("@")[0] in METRIC_ORDER]
    return sorted(known, key=lambda m: (METRIC_ORDER.index(m.split("@")[0]), m))


def _slice_columns(records: list[dict[str, Any]], metrics: list[str]) -> list[tuple[str, str, list[str]]]:
    """(result key, column prefix, metrics) of each slice that some record reports."""
    return [(key, label, metrics) for key, label in (("test_cold_result", "cold"), ("test_new_result", "new"))
            if any(r["result"].get(key) for r in records)]


def _backbone_slice_columns(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(model's slice key, its backbone's slice key, label) of each slice whose own-backbone value some record has."""
    return [entry for entry in BACKBONE_SLICES if any(r["result"].get(entry[1]) for r in records)]


def backbone_cell(value: float | None, backbone: float | None) -> str:
    """The own backbone's test value and the model's ratio to it ("-" for models without one)."""
    if value is None or not backbone:
        return "-"
    return f"{backbone:.4f} ({value / backbone:.3f}x)"


def markdown_table(records: list[dict[str, Any]], metrics: list[str] | None = None,
                   notes: dict[tuple[str, str], str] | None = None, slice_metrics: list[str] | None = None) -> str:
    """One row per model: valid/test metrics, cold and new slices, cost, why training stopped, and cost
    ratio to the first model; ``notes`` (keyed by (model, setting)) adds a last column."""
    first_test = records[0]["result"]["test_result"] or {}
    metrics = metrics or _ordered_metrics(first_test)
    slice_metrics = slice_metrics or metrics[:2]
    base_epoch = records[0]["cost"].get("sec_per_epoch") or float("nan")
    slices = _slice_columns(records, slice_metrics)
    budgets = any(r["cost"].get("train_time_budget") for r in records)
    threads = threads_differ(r["cost"] for r in records)
    backbones = any(r["result"].get("backbone_test_result") for r in records)
    backbone_slices = _backbone_slice_columns(records)
    header = (["model", "setting", f"valid {metrics[0]}"] + [f"test {m}" for m in metrics]
              + [f"{label} {m}" for _, label, ms in slices for m in ms + ["users"]]
              + ([f"own backbone test {metrics[0]} (ratio)"] if backbones else [])
              + [f"own backbone {label} {metrics[0]} (ratio)" for _, _, label in backbone_slices]
              + ["s/epoch", f"s/epoch vs {records[0]['model']}"] + (["threads"] if threads else [])
              + ["epochs (best)", "stopped_by"] + (["budget s"] if budgets else [])
              + ["s to best", "eval s", "peak MB"] + (["notes"] if notes else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        valid = record["result"].get("best_valid_result") or {}
        test = record["result"].get("test_result") or {}
        cost = record["cost"]
        cells = [record["model"], record.get("setting", "default"), f"{valid.get(metrics[0], float('nan')):.4f}"]
        cells += [f"{test.get(m, float('nan')):.4f}" for m in metrics]
        for key, _, ms in slices:
            part = record["result"].get(key) or {}
            cells += [f"{part.get(m, float('nan')):.4f}" for m in ms] + [f"{part.get('n_users', 0):.0f}"]
        if backbones:
            cells.append(backbone_cell(test.get(metrics[0]), (record["result"].get("backbone_test_result") or {}).get(metrics[0])))
        for own_key, backbone_key, _ in backbone_slices:
            cells.append(backbone_cell((record["result"].get(own_key) or {}).get(metrics[0]),
                                       (record["result"].get(backbone_key) or {}).get(metrics[0])))
        cells += [f"{cost['sec_per_epoch']:.1f}", f"{cost['sec_per_epoch'] / base_epoch:.2f}x"]
        cells += [threads_cell([cost])] if threads else []
        cells += [f"{cost['epochs']} ({cost.get('best_epoch', 0)})", stop_cell(cost)]
        cells += [budget_cell(cost)] if budgets else []
        cells += [f"{cost.get('time_to_best_sec', 0.0):.0f}", f"{cost['eval_sec']:.1f}", f"{cost['peak_mem_mb']:.0f}"]
        if notes:
            cells.append(notes.get((record["model"], record.get("setting", "default")), ""))
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
    atomic_write_with(path, lambda temp: figure.savefig(temp, dpi=dpi))
    plt.close(figure)


def write_text(path: Path, text: str) -> None:
    """A results file written atomically (a reader never sees half a table)."""
    atomic_write_text(path, text)


def write_comparison(records: list[dict[str, Any]], dataset: str, output_dir: Path, name: str,
                     preface: str = "", reference: str | list[str] | None = None, per_user_dir: Path | None = None,
                     metrics: list[str] | None = None, notes: dict[tuple[str, str], str] | None = None,
                     slice_metrics: list[str] | None = None, kept_significance: list[list[Any]] | None = None) -> None:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.png`` under ``output_dir``.

    Records with a ``seed`` (several seeds) also get aggregate rows and a mean ± std table; with
    ``reference`` (``Model`` or ``Model:setting``, or several as a comma list or list, the first the
    primary) and the runs' per-user files in ``per_user_dir``, the paired-bootstrap rows and one
    table per reference (see the module docstring). A reference not among the records adds nothing.
    ``kept_significance``: bootstrap rows of an earlier file (``kept_significance_rows``), written
    where this call computes no row of the same (model, setting, split, metric).
    """
    output_dir = Path(output_dir)
    rows = [[*row[:-1], float(f"{row[-1]:.6g}")] for r in records for row in long_rows(r, dataset)]  # as the CSV holds them,
    seeded = any(r.get("seed") is not None for r in records)  # so tables re-rendered from the CSV come out the same
    if seeded:
        rows += aggregate_rows(rows)
    references = parse_references(reference) if per_user_dir else []
    significance = [row for index, ref in enumerate(references)
                    for row in significance_rows(records, dataset, ref, Path(per_user_dir), secondary=index > 0)]
    computed = {tuple(row[1:5]) for row in significance}
    significance += [[*row[:-1], float(row[-1])] for row in kept_significance or [] if tuple(row[1:5]) not in computed]
    if references:  # the marker of what the unmarked (primary) bootstrap rows are against
        ref_model, ref_setting = _reference_key(references[0])
        if any((r["model"], r.get("setting", "default")) == (ref_model, ref_setting) for r in records):
            significance.append([dataset, ref_model, setting_label(ref_setting, "mean" if seeded else None), "test",
                                 PRIMARY_REFERENCE_METRIC, 1.0])
    rows += significance
    write_csv(rows, output_dir / f"{name}.csv")
    if seeded:
        table = seeds_table(rows, metrics, notes, slice_metrics, references) + "\n" + per_seed_table(rows, (metrics or ["ndcg@10"])[0])
        chart_records = records_from_rows(rows, aggregate="mean")
    else:
        table = markdown_table(records, metrics, notes, slice_metrics)
        chart_records = records
    for index, ref in enumerate(references):
        part = significance_table(significance, ref, primary=index == 0)
        if part:
            table += "\n" + part
    atomic_write_text(output_dir / f"{name}.md", f"# {name}\n\n{preface}{table}")
    bar_chart(chart_records, output_dir / f"{name}.png", f"{dataset}: test metrics" + (" (mean over seeds)" if seeded else ""))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _row_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [row if isinstance(row, dict) else dict(zip(CSV_HEADER, row)) for row in rows]


def records_from_rows(rows: Iterable[Any], aggregate: str | None = None) -> list[dict[str, Any]]:
    """Records rebuilt from long-form rows (lists or CSV dicts), in first-appearance order.

    ``aggregate`` None: one record per run (``seed`` set for a run of several seeds; aggregate and
    bootstrap rows skipped). ``mean``/``std``: one record per (model, setting) of those aggregate rows.
    """
    cost_metrics = {metric for _, metric in COST_ROWS}
    split_keys = dict(RESULT_SPLITS)
    records: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    for row in _row_dicts(rows):
        setting, kind = parse_setting_label(row["setting"])
        if (kind in AGGREGATES) != (aggregate is not None) or (aggregate is not None and kind != aggregate):
            continue
        if is_diff_metric(row["metric"]) or row["metric"] == PRIMARY_REFERENCE_METRIC:
            continue
        seed = int(kind.removeprefix("seed_")) if kind and kind.startswith("seed_") else None
        record = records.setdefault((row["model"], setting, seed), {
            "model": row["model"], "setting": setting, "seed": seed, "result": {}, "cost": {"extra": {}}})
        value = float(row["value"])
        metric, split = row["metric"], row["split"]
        if split == "valid_curve":
            seconds = float(metric.removeprefix("score_at_").removesuffix("s"))
            record["cost"].setdefault("valid_curve", []).append((seconds, value))
        elif metric.startswith("stopped_by_") and split == "train":
            if aggregate is None and value == 1.0:
                record["cost"]["stopped_by"] = metric.removeprefix("stopped_by_")
        elif metric in cost_metrics and (split, metric) in COST_ROWS:
            record["cost"][metric] = int(value) if metric in INTEGER_COSTS and aggregate is None else value
        elif split == "train":
            record["cost"]["extra"][metric] = value
        else:
            record["result"].setdefault(split_keys[split], {})[metric] = value
    return list(records.values())


def records_from_csv(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(dataset, records) rebuilt from a long-form CSV, one per run, in first-appearance order, for
    re-rendering tables or resuming a comparison (aggregate and bootstrap rows are recomputed)."""
    rows = read_csv(path)
    return (rows[-1]["dataset"] if rows else ""), records_from_rows(rows)


def aggregate_rows(rows: Iterable[Any]) -> list[list[Any]]:
    """``mean`` and ``std`` rows over the seeds of every (model, setting, split, metric) of per-seed rows.

    ``std`` is the sample standard deviation (ddof 1), written when at least two seeds have the value.
    The seed row and the valid curve (its time points differ per seed) are not aggregated.
    """
    groups: dict[tuple[str, str, str], dict[tuple[str, str], list[float]]] = {}
    for row in _row_dicts(rows):
        setting, kind = parse_setting_label(row["setting"])
        if not (kind or "").startswith("seed_") or row["split"] == "valid_curve" or row["metric"] == "seed":
            continue
        if is_diff_metric(row["metric"]):
            continue
        block = groups.setdefault((row["dataset"], row["model"], setting), {})
        block.setdefault((row["split"], row["metric"]), []).append(float(row["value"]))
    out: list[list[Any]] = []
    for (dataset, model, setting), block in groups.items():
        for kind in AGGREGATES:
            label = setting_label(setting, kind)
            for (split, metric), values in block.items():
                if kind == "mean":
                    out.append([dataset, model, label, split, metric, float(np.mean(values))])
                elif len(values) >= 2:
                    out.append([dataset, model, label, split, metric, float(np.std(values, ddof=1))])
    return out


def paired_bootstrap(users: np.ndarray, differences: np.ndarray, n_boot: int = 10000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float, int]:
    """(mean difference, interval low, interval high, users) of a paired bootstrap over users, pooled over seeds.

    ``users[i]`` had ``differences[i]`` (model minus reference) in one seed. The estimate is the mean
    over all (user, seed) pairs: the mean over seeds of each seed's mean difference when every seed
    scores the same users. Users are the resampled unit (a user's pairs from every seed are drawn
    together, a cluster bootstrap): users in sorted order are drawn with replacement ``n_boot``
    times (``numpy.random.default_rng(seed)``, one ``integers(0, n_users, n_users)`` draw per
    resample), and the interval is the percentile interval of the resampled estimates.
    """
    keys, inverse = np.unique(np.asarray(users), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(differences, dtype=np.float64))
    counts = np.bincount(inverse).astype(np.float64)
    n = len(keys)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // max(n, 1))
    estimates = []
    for start in range(0, n_boot, chunk):
        drawn = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        estimates.append(sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.concatenate(estimates), [tail, 1.0 - tail])
    return float(sums.sum() / counts.sum()), float(low), float(high), n


def per_user_path(per_user_dir: Path, model: str, setting: str, seed: int | None) -> Path:
    """Where a comparison keeps one run's per-user test metrics (``<model>__<setting>__seed<N>.csv``)."""
    return Path(per_user_dir) / f"{model}__{setting}__seed{seed}.csv"


def read_per_user(path: Path) -> dict[str, np.ndarray]:
    """A per-user metrics CSV (written by ``quick_start.save_per_user_metrics``) as columns."""
    rows = read_csv(path)
    if not rows:
        return {"user": np.zeros(0, dtype=str)}
    return {key: np.array([r[key] for r in rows], dtype=str if key == "user" else np.float64) for key in rows[0]}


def _flags(table: dict[str, np.ndarray], split: str) -> np.ndarray:
    """A per-user table's 0/1 column for ``split`` (all 0 when the file has none)."""
    return table.get(split, np.zeros(len(table["user"])))


def significance_rows(records: list[dict[str, Any]], dataset: str, reference: str, per_user_dir: Path,
                      metric: str | None = None, n_boot: int = 10000, secondary: bool = False) -> list[list[Any]]:
    """Paired-bootstrap rows (``<metric>_diff``, ``_diff_lo``, ``_diff_hi``) of every model against ``reference``.

    ``secondary``: a further reference of the comparison, its rows named ``<metric>_diff_vs_<reference>`` etc.
    so they sit next to the primary reference's rows in one CSV; the values are the same as if it were primary.

    ``metric`` defaults to ``ndcg@10``, or the first NDCG column when the runs did not compute @10.

    Pairs are the test users both runs of a seed scored (restricted, for ``test_cold`` / ``test_new``,
    to the users both flag as in that slice); seeds both models ran are pooled (``paired_bootstrap``).
    Runs without a per-user file in ``per_user_dir`` are left out.
    """
    ref_model, _, ref_setting = reference.partition(":")
    ref_setting = ref_setting or "default"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["model"], record.get("setting", "default")), []).append(record)
    tables = {}
    for (model, setting), group in groups.items():
        for record in group:
            path = per_user_path(per_user_dir, model, setting, record_seed(record))
            if path.is_file():
                tables[(model, setting, record_seed(record))] = read_per_user(path)
    rows: list[list[Any]] = []
    vs = f"_vs_{reference}" if secondary else ""
    reference_tables = [t for (m, st, _), t in tables.items() if (m, st) == (ref_model, ref_setting)]
    if metric is None and reference_tables:
        columns = [c for c in reference_tables[0] if c.startswith("ndcg@")]
        metric = "ndcg@10" if "ndcg@10" in columns else (columns[0] if columns else "")
    for (model, setting), group in groups.items():
        if (model, setting) == (ref_model, ref_setting) or not metric:
            continue
        label = setting_label(setting, "mean") if any(r.get("seed") is not None for r in group) else setting
        pairs = [(tables[(model, setting, s)], tables[(ref_model, ref_setting, s)]) for s in dict.fromkeys(record_seed(r) for r in group)
                 if (model, setting, s) in tables and (ref_model, ref_setting, s) in tables]
        for split in SIGNIFICANCE_SPLITS:
            users, differences = [], []
            for ours, theirs in pairs:
                if metric not in ours or metric not in theirs:
                    continue
                common, ours_at, theirs_at = np.intersect1d(ours["user"], theirs["user"], return_indices=True)
                if split != "test":  # users both runs flag as in the slice
                    inside = (_flags(ours, split)[ours_at] > 0) & (_flags(theirs, split)[theirs_at] > 0)
                    common, ours_at, theirs_at = common[inside], ours_at[inside], theirs_at[inside]
                users.append(common)
                differences.append(ours[metric][ours_at] - theirs[metric][theirs_at])
            if not users or sum(len(u) for u in users) == 0:
                continue
            mean, low, high, _ = paired_bootstrap(np.concatenate(users), np.concatenate(differences), n_boot)
            pooled = sum(len(u) > 0 for u in users)
            rows += [[dataset, model, label, split, f"{metric}{suffix}{vs}", value]
                     for suffix, value in zip((*DIFF_SUFFIXES, SEEDS_SUFFIX), (mean, low, high, pooled))]
    return rows


def _reference_key(reference: str) -> tuple[str, str]:
    model, _, setting = reference.partition(":")
    return model, setting or "default"


def kept_significance_rows(earlier_rows: Iterable[Any], references: str | list[str] | None,
                           unchanged: set[tuple[str, str]]) -> list[list[Any]]:
    """The bootstrap rows of an earlier results file that still hold for a resumed comparison.

    Why: per-user metrics live outside the results, so a fresh checkout or another machine resumes a
    comparison without them and could not recompute any bootstrap row of the runs it keeps. A row is
    kept when its model's (model, setting) and its reference are both in ``unchanged`` (no run of
    theirs trained in this call) and its reference is still one of ``references``; it is renamed when
    that reference moved between primary and further. The earlier primary reference is the file's
    ``primary_reference`` row; in files from before it, the one (model, setting) with runs but no
    primary bootstrap row (none kept when that is not exactly one). ``earlier_rows``: CSV rows (dicts
    or lists); returns CSV rows as lists.
    """
    rows = _row_dicts(earlier_rows)
    marked = {(row["model"], parse_setting_label(row["setting"])[0]) for row in rows if row["metric"] == PRIMARY_REFERENCE_METRIC}
    runs = {(row["model"], parse_setting_label(row["setting"])[0]) for row in rows
            if not is_diff_metric(row["metric"]) and row["metric"] != PRIMARY_REFERENCE_METRIC}
    with_primary_rows = {(row["model"], parse_setting_label(row["setting"])[0]) for row in rows
                         if (split_diff_metric(row["metric"]) or ("", "", ""))[2] is None}
    candidates = marked or (runs - with_primary_rows)
    earlier_primary = next(iter(candidates)) if with_primary_rows and len(candidates) == 1 else None
    now = {_reference_key(ref): (index, ref) for index, ref in enumerate(parse_references(references))}
    kept: list[list[Any]] = []
    for row in rows:
        parts = split_diff_metric(row["metric"])
        if parts is None:
            continue
        metric, suffix, further = parts
        reference = _reference_key(further) if further is not None else earlier_primary
        if reference is None or reference not in now or reference not in unchanged:
            continue
        if (row["model"], parse_setting_label(row["setting"])[0]) not in unchanged:
            continue
        index, spelled = now[reference]
        name = f"{metric}{suffix}" + ("" if index == 0 else f"_vs_{spelled}")
        kept.append([row["dataset"], row["model"], row["setting"], row["split"], name, float(row["value"])])
    return kept


def _verdict(low: float, high: float) -> str:
    return "significant" if low > 0 or high < 0 else "within noise"


def significance_table(rows: Iterable[Any], reference: str, primary: bool = True) -> str:
    """One line per (model, setting, split) of the bootstrap rows against ``reference``: difference, 95% interval,
    verdict. ``primary``: its rows are the unmarked ``_diff`` ones, else the ``_vs_<reference>`` ones."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in _row_dicts(rows):
        parts = split_diff_metric(row["metric"])
        if parts is None or parts[2] != (None if primary else reference):
            continue
        key = (row["model"], row["setting"], row["split"])
        found.setdefault(key, {"metric": parts[0]})[parts[1]] = float(row["value"])
    if not found:
        return ""
    metric = next(iter(found.values()))["metric"]
    lines = [f"Paired bootstrap over test users of the {metric} difference to {reference} (95% interval), pooled over the "
             "seeds both runs have per-user metrics for (`seeds`; per-user files stay with the machine that ran them, "
             "so a row computed after a rerun elsewhere pools only the seeds run there; - = not recorded):", "",
             "| model | setting | split | difference | 95% interval | verdict | seeds |", "|---|---|---|---|---|---|---|"]
    for (model, setting, split), values in found.items():
        seeds = f"{values[SEEDS_SUFFIX]:.0f}" if SEEDS_SUFFIX in values else "-"
        lines.append(f"| {model} | {setting} | {split} | {values['_diff']:+.4f} | [{values['_diff_lo']:+.4f}, "
                     f"{values['_diff_hi']:+.4f}] | {_verdict(values['_diff_lo'], values['_diff_hi'])} | {seeds} |")
    return "\n".join(lines) + "\n"


def seeds_table(rows: Iterable[Any], metrics: list[str] | None = None, notes: dict[tuple[str, str], str] | None = None,
                slice_metrics: list[str] | None = None, reference: str | list[str] | None = None) -> str:
    """One row per (model, setting): mean ± std over seeds of the test and slice metrics and of the cost,
    how each seed stopped, and the bootstrap difference of the test metric to each ``reference`` that has
    rows (a column each, the primary first; ``parse_references`` spells them)."""
    rows = _row_dicts(rows)
    means = {(r["model"], r["setting"]): r for r in records_from_rows(rows, aggregate="mean")}
    stds = {(r["model"], r["setting"]): r for r in records_from_rows(rows, aggregate="std")}
    runs = records_from_rows(rows)
    first = next(iter(means.values()))
    metrics = metrics or _ordered_metrics(first["result"].get("test_result") or {})
    slice_metrics = slice_metrics or metrics[:2]
    slices = _slice_columns(list(means.values()), slice_metrics)
    diffs: dict[str | None, dict[tuple[str, str, str], float]] = {}  # reference (None: primary) -> (model, setting, metric)
    diff_metrics: dict[str | None, str] = {}  # the first metric with a difference row, per reference
    for row in rows:
        parts = split_diff_metric(row["metric"]) if row["split"] == "test" else None
        if parts is not None:
            key = (row["model"], parse_setting_label(row["setting"])[0], parts[0] + parts[1])
            diffs.setdefault(parts[2], {})[key] = float(row["value"])
            if parts[1] == "_diff":
                diff_metrics.setdefault(parts[2], parts[0])
    keyed = [(ref, None if index == 0 else ref) for index, ref in enumerate(parse_references(reference))]
    columns = [(ref, key) for ref, key in keyed if diffs.get(key)]  # (as titled, key in diffs) of references with rows
    budgets = any(r["cost"].get("train_time_budget") for r in means.values())
    threads = threads_differ(r["cost"] for r in runs)
    backbones = any(r["result"].get("backbone_test_result") for r in means.values())
    backbone_slices = _backbone_slice_columns(list(means.values()))
    header = (["model", "setting", "seeds"] + [f"test {m}" for m in metrics]
              + [f"{label} {m}" for _, label, ms in slices for m in ms + ["users"]]
              + ([f"own backbone test {metrics[0]} (ratio)"] if backbones else [])
              + [f"own backbone {label} {metrics[0]} (ratio)" for _, _, label in backbone_slices]
              + [f"test {diff_metrics.get(key, 'ndcg@10')} - {ref} [95%]" for ref, key in columns]
              + ["s/epoch"] + (["threads"] if threads else []) + ["epochs", "stopped_by"] + (["budget s"] if budgets else [])
              + ["peak MB"] + (["notes"] if notes else []))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(key: tuple[str, str], result_key: str, metric: str, digits: int = 4) -> str:
        mean = (means[key]["result"].get(result_key) or {}).get(metric)
        std = ((stds.get(key) or {"result": {}})["result"].get(result_key) or {}).get(metric)
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    def cost_cell(key: tuple[str, str], metric: str, digits: int) -> str:
        mean = means[key]["cost"].get(metric)
        std = (stds.get(key) or {"cost": {}})["cost"].get(metric)
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    for key, record in means.items():
        model, setting = key
        group = [r for r in runs if (r["model"], r["setting"]) == key]
        reasons = [stop_cell(r["cost"]) for r in group]
        stopped = ", ".join(f"{reason} x{reasons.count(reason)}" for reason in dict.fromkeys(reasons))
        cells = [model, setting, str(len(group))] + [cell(key, "test_result", m) for m in metrics]
        for result_key, _, ms in slices:
            cells += [cell(key, result_key, m) for m in ms] + [cell(key, result_key, "n_users", 0)]
        if backbones:
            cells.append(backbone_cell((record["result"].get("test_result") or {}).get(metrics[0]),
                                       (record["result"].get("backbone_test_result") or {}).get(metrics[0])))
        for own_key, backbone_key, _ in backbone_slices:
            cells.append(backbone_cell((record["result"].get(own_key) or {}).get(metrics[0]),
                                       (record["result"].get(backbone_key) or {}).get(metrics[0])))
        for _, ref_key in columns:
            found = [diffs[ref_key].get((model, setting, f"{diff_metrics.get(ref_key, 'ndcg@10')}{suffix}")) for suffix in DIFF_SUFFIXES]
            cells.append("-" if None in found else f"{found[0]:+.4f} [{found[1]:+.4f}, {found[2]:+.4f}] {_verdict(found[1], found[2])}")
        cells += [cost_cell(key, "sec_per_epoch", 1)] + ([threads_cell(r["cost"] for r in group)] if threads else [])
        cells += [cost_cell(key, "epochs", 1), stopped]
        cells += [budget_cell(record["cost"])] if budgets else []
        cells.append(cost_cell(key, "peak_mem_mb", 0))
        if notes:
            cells.append(notes.get(key, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(rows: Iterable[Any], metric: str = "ndcg@10") -> str:
    """Test ``metric`` of every run, one column per seed."""
    runs = records_from_rows(rows)
    seeds = sorted({r["seed"] for r in runs if r["seed"] is not None})
    table: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        value = (run["result"].get("test_result") or {}).get(metric)
        if run["seed"] is not None and value is not None:
            table.setdefault((run["model"], run["setting"]), {})[run["seed"]] = value
    lines = [f"Test {metric} per seed:", "", "| model | setting | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (2 + len(seeds))]
    for (model, setting), values in table.items():
        lines.append(f"| {model} | {setting} | " + " | ".join(f"{values[s]:.4f}" if s in values else "-" for s in seeds) + " |")
    return "\n".join(lines) + "\n"
