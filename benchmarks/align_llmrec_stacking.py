"""AlignLLMRec trained by stacking: the backbone never sees each user's last training target as a
target, and AlignLLMRec learns from exactly those samples, where the backbone's scores are honest.

Trained on the backbone's own training samples (the default recipe), AlignLLMRec's residual head
learns to fit targets the backbone already fits, and drifts below it on validation. Holding the
last ``--holdout`` targets per user out of the backbone's loss (they stay visible as inputs) gives
a small, honest training set for the LLM (one sample per user on ml-100k: 943).

Rows: AlignSASRec ``backbone`` (all training targets), AlignSASRec ``backbone_holdout`` (last
targets held out), AlignLLMRec ``stacked`` (on the holdout backbone, validated before training so
selection keeps the start when training does not help) and ``stacked_trained`` (the trained model
itself). Metrics: NDCG@10, Recall@10, HitRate@100, cold slice.

    python benchmarks/align_llmrec_stacking.py --dataset=ml-100k --holdout=1 --llm-epochs=5
    python benchmarks/align_llmrec_stacking.py --dataset=ml-1m --holdout=1 --llm-epochs=3 --backbone-epochs=15 --skip-guarded
    python benchmarks/align_llmrec_stacking.py --dataset=ml-1m --holdout=1 --llm-epochs=3 --backbone-epochs=15 --skip-guarded --seed=2021
    # one table over runs (seeds): ratios per run and their mean
    python benchmarks/align_llmrec_stacking.py --aggregate benchmarks/results/align_llmrec_stacking_ml1m*.csv
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def ndcg(record: dict | None, split: str) -> float | None:
    key = "test_result" if split == "test" else "best_valid_result"
    return (record or {}).get("result", {}).get(key, {}).get("ndcg@10") if record else None


def ratios(records: list[dict]) -> dict[str, dict[str, float]]:
    """NDCG@10 of the trained and the selected AlignLLMRec over the full and the holdout backbone, per split.

    ``selected`` is what the default recipe (``validate_before_training``) ends with: the trained
    model if its best epoch beats the start on valid, else the start, which ranks exactly as the
    holdout backbone. It is read from the ``stacked`` row when present, else derived from
    ``stacked_trained`` and ``backbone_holdout`` (the two runs train identically).
    """
    by = {(r["model"], r["setting"]): r for r in records}
    full, held = by.get(("AlignSASRec", "backbone")), by.get(("AlignSASRec", "backbone_holdout"))
    trained = by.get(("AlignLLMRec", "stacked_trained"))
    selected = by.get(("AlignLLMRec", "stacked"))
    if selected is None and trained and held:
        selected = trained if ndcg(trained, "valid") > ndcg(held, "valid") else held
    out: dict[str, dict[str, float]] = {}
    for name, llm in (("trained", trained), ("selected", selected)):
        for split in ("valid", "test"):
            for base_name, base in (("full", full), ("holdout", held)):
                if llm and base and ndcg(llm, split) is not None and ndcg(base, split):
                    out.setdefault(name, {})[f"{split}_vs_{base_name}"] = ndcg(llm, split) / ndcg(base, split)
    return out


def summary(records: list[dict]) -> str:
    lines = []
    for name, values in ratios(records).items():
        what = "trained (best valid epoch)" if name == "trained" else "selected (the default recipe: start kept unless an epoch beats it on valid)"
        lines.append(f"- AlignLLMRec {what}: test NDCG@10 = {values.get('test_vs_full', float('nan')):.3f}x the full backbone "
                     f"(goal >= 1.03x), {values.get('test_vs_holdout', float('nan')):.3f}x its holdout backbone; "
                     f"valid {values.get('valid_vs_full', float('nan')):.3f}x the full backbone")
    return "\n".join(lines) + "\n\n"


def aggregate(paths: list[Path], name: str) -> None:
    """One table over several runs (seeds): NDCG@10 ratios per run and their mean."""
    from statistics import mean

    from recbole_llmalign import report

    paths = [path for path in paths if path.stem != name]  # a glob may include this table's own CSV
    rows, table = [], ["| run | dataset | AlignLLMRec | test / full backbone | test / holdout backbone | valid / full backbone |",
                       "|---|---|---|---|---|---|"]
    collected: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in paths:
        dataset, records = report.records_from_csv(path)
        for kind, values in ratios(records).items():
            table.append(f"| {path.stem} | {dataset} | {kind} | {values['test_vs_full']:.3f}x | {values['test_vs_holdout']:.3f}x "
                         f"| {values['valid_vs_full']:.3f}x |")
            for metric, value in values.items():
                split, versus = metric.split("_vs_")
                rows.append([dataset, "AlignLLMRec", f"{kind} {path.stem}", split, f"ndcg@10_vs_{versus}_backbone", value])
                collected.setdefault((dataset, kind), {}).setdefault(metric, []).append(value)
    for (dataset, kind), values in collected.items():
        count = len(values["test_vs_full"])
        table.append(f"| mean of {count} | {dataset} | {kind} | {mean(values['test_vs_full']):.3f}x | "
                     f"{mean(values['test_vs_holdout']):.3f}x | {mean(values['valid_vs_full']):.3f}x |")
        for metric, series in values.items():
            split, versus = metric.split("_vs_")
            rows.append([dataset, "AlignLLMRec", f"{kind} mean of {count}", split, f"ndcg@10_vs_{versus}_backbone", mean(series)])
    report.write_csv(rows, RESULTS / f"{name}.csv")
    text = (f"# {name}\n\nNDCG@10 of AlignLLMRec trained by stacking over its AlignSASRec backbones, one row per run "
            f"({', '.join(p.name for p in paths)}); `trained` = the best valid epoch of training, `selected` = what "
            "the default recipe keeps (the start, i.e. the holdout backbone, unless an epoch beats it on valid). "
            "Goal: test >= 1.03x the backbone.\n\n" + "\n".join(table) + "\n")
    report.write_text(RESULTS / f"{name}.md", text)
    plot_ratios(collected, paths, RESULTS / f"{name}.png")
    print(text)


def plot_ratios(collected: dict, paths: list[Path], path: Path) -> None:
    """Test NDCG@10 / full backbone per run and kind, with the 1.03x goal line."""
    import matplotlib

    from recbole_llmalign import report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for (dataset, kind), series in collected.items():
        for index, value in enumerate(series["test_vs_full"]):
            labels.append(f"{dataset} {kind} #{index + 1}")
            values.append(value)
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(values) + 1.5))
    axes.barh(labels, values, color=["tab:blue" if "trained" in label else "tab:orange" for label in labels])
    axes.axvline(1.0, color="black", linewidth=1)
    axes.axvline(1.03, color="red", linestyle="--", linewidth=1, label="goal 1.03x")
    axes.set_xlim(min(values + [0.95]) - 0.01, max(values + [1.08]) + 0.01)
    axes.set_xlabel("test NDCG@10 / full backbone")
    axes.legend()
    report.save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--holdout", type=int, default=1, help="last training targets per user held out of the backbone")
    parser.add_argument("--backbone-epochs", type=int, default=50)
    parser.add_argument("--llm-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--skip-guarded", action="store_true",
                        help="train only stacked_trained: stacked trains identically and differs only by keeping the start when "
                             "no epoch beats it on valid, i.e. it is backbone_holdout or stacked_trained, whichever validates higher")
    parser.add_argument("--seed", type=int, default=2020, help="RecBole seed of every row (backbone init, sample order)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--aggregate", nargs="*", default=None, metavar="CSV",
                        help="no training: one table of the NDCG@10 ratios of these earlier runs' CSVs and their mean "
                             "(written as results/<name or align_llmrec_stacking_seeds>.md)")
    parser.add_argument("--from-csv", action="store_true", help="only re-render the table from results/<name>.csv")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from recbole_llmalign import report
    from recbole_llmalign.quick_start import compare

    if args.aggregate is not None:
        aggregate([Path(p) for p in args.aggregate], args.name or "align_llmrec_stacking_seeds")
        return
    name = args.name or f"align_llmrec_stacking_{args.dataset.replace('-', '')}" + ("" if args.seed == 2020 else f"_seed{args.seed}")
    if args.from_csv:
        dataset, records = report.records_from_csv(RESULTS / f"{name}.csv")
        report.write_comparison(records, dataset, RESULTS, name, preface=summary(records))
        print((RESULTS / f"{name}.md").read_text())
        return
    shared = {"seed": args.seed, "show_progress": False, "metrics": ["Recall", "NDCG", "Hit"], "topk": [10, 100],
              "valid_metric": "NDCG@10", "stopping_step": 10, "cold_item_threshold": 5}
    backbones = compare([("AlignSASRec", "backbone", {"epochs": args.backbone_epochs}),
                         ("AlignSASRec", "backbone_holdout", {"epochs": args.backbone_epochs, "holdout_last_targets": args.holdout})],
                        args.dataset, config_dict=shared, output_dir=RESULTS, name=name)
    checkpoint = backbones[1]["cost"]["checkpoint"]
    llm = {"backbone_checkpoint": checkpoint, "holdout_last_targets": args.holdout, "epochs": args.llm_epochs,
           "learning_rate": args.learning_rate}
    llm_runs = [] if args.skip_guarded else [("AlignLLMRec", "stacked", llm)]
    llm_runs.append(("AlignLLMRec", "stacked_trained", {**llm, "validate_before_training": False}))
    records = backbones + compare(llm_runs,
                                  args.dataset, config_dict=shared, output_dir=RESULTS, name=name + "_llm")
    for suffix in (".md", ".csv", ".png"):
        (RESULTS / f"{name}_llm{suffix}").unlink(missing_ok=True)
    setup = (f"Dataset {args.dataset}; seed {args.seed}; AlignSASRec defaults (all_positions), {args.backbone_epochs} epochs max; "
             f"backbone_holdout leaves each user's last {args.holdout} training target(s) out of the loss. AlignLLMRec: YAML "
             f"defaults (SmolLM2-135M, 8 layers), trained {args.llm_epochs} epochs at lr {args.learning_rate:g} on the held-out "
             f"samples only; {os.environ.get('OMP_NUM_THREADS', '2')} CPU threads.\n\n")
    report.write_comparison(records, args.dataset, RESULTS, name, preface=setup + summary(records))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
