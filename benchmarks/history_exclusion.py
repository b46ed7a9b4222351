"""How much of a sequential model's top 10 is spent on items the user already has, and what
ranking them last (``exclude_history_items``) is worth, per saved model, in one table.

RecBole's full ranking masks training items for general models but not for sequential ones,
whose scores for the input history are left as they are. On data without repeat consumption
(MovieLens ratings: one rating per user and movie) a history item is never the answer, so every
top-10 slot it takes is lost. For each model file this evaluates the test set twice, under
RecBole's protocol and with the input history ranked last, and reports the share of test users
whose most recent item is in the model's own top 10. Evaluation only: no training.

    python benchmarks/history_exclusion.py --name=history_exclusion_ml1m \
        SASRec=/runs/ml1m/saved/SASRec-<time>.pth AlignSASRec=/runs/ml1m/saved/AlignSASRec-<time>.pth

Each argument is ``label=model_file``. A file inside a ``saved/`` folder is evaluated from that
folder's parent, where the run's relative data and backbone paths point.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ndcg@10", "recall@10")


def evaluate(model_file: Path) -> tuple[str, str, dict[str, float]]:
    """(dataset, model name, metrics) of one checkpoint under both protocols."""
    import torch

    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.trainer import with_run_controls
    from recbole_llmalign.utils import get_trainer

    config, model, _, _, _, test_data = load_data_and_model(model_file)
    config["show_progress"] = False
    trainer = with_run_controls(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model)
    last_in_top10: list[torch.Tensor] = []
    full_sort = trainer._full_sort_batch_eval

    def recording(batched_data):  # the rank of each user's most recent item, read from the same scores
        interaction, scores, positive_u, positive_i = full_sort(batched_data)
        if not config["exclude_history_items"]:
            seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
            last = seq[torch.arange(seq.size(0)), (length - 1).clamp(min=0)].to(scores.device)
            last_in_top10.append((scores > scores.gather(1, last[:, None])).sum(1) < 10)
        return interaction, scores, positive_u, positive_i

    trainer._full_sort_batch_eval = recording
    out: dict[str, float] = {}
    for excluded in (False, True):
        config["exclude_history_items"] = excluded
        result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        for metric in METRICS:
            out[f"{metric} excluded" if excluded else metric] = float(result[metric])
    out["last item in top 10"] = float(torch.cat(last_in_top10).float().mean())
    return config["dataset"], config["model"], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=MODEL_FILE")
    parser.add_argument("--name", default="history_exclusion")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from tqdm import tqdm

    from recbole_llmalign import report

    rows, table = [], ["| model | setting | test NDCG@10 | NDCG@10, history ranked last | ratio | test Recall@10 | "
                       "Recall@10, history ranked last | users whose last item is in their top 10 |",
                       "|---|---|---|---|---|---|---|---|"]
    start = Path.cwd()
    records = []
    for spec in tqdm(args.models, desc="models", unit="model"):
        label, _, path = spec.partition("=")
        model_file = Path(path).resolve()
        os.chdir(model_file.parent.parent if model_file.parent.name == "saved" else start)
        try:
            dataset, model_name, values = evaluate(model_file)
        finally:
            os.chdir(start)
        records.append((dataset, model_name, label, values))
        table.append(f"| {model_name} | {label} | {values['ndcg@10']:.4f} | {values['ndcg@10 excluded']:.4f} | "
                     f"{values['ndcg@10 excluded'] / max(values['ndcg@10'], 1e-9):.2f}x | {values['recall@10']:.4f} | "
                     f"{values['recall@10 excluded']:.4f} | {values['last item in top 10']:.1%} |")
        for key, value in values.items():
            metric = key.removesuffix(" excluded")
            split = "test_history_excluded" if key.endswith(" excluded") else "test"
            rows.append([dataset, model_name, label, split, metric.replace(" ", "_"), value])
    datasets = sorted({r[0] for r in records})
    report.write_csv(rows, RESULTS / f"{args.name}.csv")
    text = (f"# {args.name}\n\nDataset {', '.join(datasets)}; saved models evaluated on their own test split, under "
            "RecBole's protocol and with `exclude_history_items: True` (each user's input history ranked last). "
            "Evaluation only.\n\n" + "\n".join(table) + "\n")
    report.write_text(RESULTS / f"{args.name}.md", text)
    plot(records, RESULTS / f"{args.name}.png")
    print(text)


def plot(records: list, path: Path) -> None:
    """Test NDCG@10 per model, under RecBole's protocol and with the history ranked last."""
    import matplotlib

    from recbole_llmalign import report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{model}\n{label}" for _, model, label, _ in records]
    positions = np.arange(len(records))
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(records)), 4))
    axes.bar(positions - 0.2, [v["ndcg@10"] for *_, v in records], 0.4, label="RecBole protocol")
    axes.bar(positions + 0.2, [v["ndcg@10 excluded"] for *_, v in records], 0.4, label="history ranked last")
    axes.set_xticks(positions, labels, fontsize=8)
    axes.set_ylabel("test NDCG@10")
    axes.legend()
    report.save_figure(figure, path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
