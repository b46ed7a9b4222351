"""RecBole built-in models through the plugin's entry point, side by side on one split.

Same config and seed for all (RecBole defaults: embedding 64, MAX_ITEM_LIST_LENGTH 50, CE loss,
time-ordered leave-one-out, full ranking). Writes benchmarks/results/<name>.{md,csv,png}.

    # ml-100k, 5 epochs each: about 40 min on a 2-core CPU
    python benchmarks/compare_builtins.py --dataset=ml-100k --models=SASRec,GRU4Rec,BERT4Rec,Pop --epochs=5 --name=compare_ml100k
    # ml-1m (benchmark protocol) under a wall-clock budget per model: about 70 min
    python benchmarks/compare_builtins.py --dataset=ml-1m --models=SASRec,GRU4Rec --epochs=300 --budget=1800 --name=compare_ml1m

The committed ml-1m SASRec/GRU4Rec rows come from benchmarks/align_sasrec.py (same compare, run
once beside AlignSASRec with a 1,500 s budget each), results/align_sasrec_ml1m.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# RecBole's published full-ranking test results on ml-1m (benchmark protocol), for reference.
PUBLISHED = {"ml-1m": {"SASRec": {"ndcg@10": 0.1286, "recall@10": 0.2468},
                       "GRU4Rec": {"ndcg@10": 0.1545, "recall@10": 0.2776}}}


def reference_table(dataset: str, records: list[dict]) -> str:
    """Our test metrics next to RecBole's published ones, with the epochs we reached."""
    published = PUBLISHED.get(dataset)
    if not published:
        return ""
    lines = ["Against RecBole's published results (full ranking, test split):\n",
             "| model | epochs run | test ndcg@10 (ours) | published | test recall@10 (ours) | published |",
             "|---|---|---|---|---|---|"]
    for record in records:
        ref = published.get(record["model"])
        if ref is None:
            continue
        test = record["result"]["test_result"]
        lines.append(f"| {record['model']} | {record['cost']['epochs']} | {test['ndcg@10']:.4f} | {ref['ndcg@10']:.4f} "
                     f"| {test['recall@10']:.4f} | {ref['recall@10']:.4f} |")
    return "\n".join(lines) + "\n\nAll runs:\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default="SASRec,GRU4Rec,BERT4Rec,Pop")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget", type=float, default=None, help="train_time_budget per model, seconds")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from recbole_llmalign import report
    from recbole_llmalign.quick_start import compare

    name = args.name or f"compare_{args.dataset.replace('-', '')}"
    config = {"epochs": args.epochs, "seed": 2020, "show_progress": False, "valid_metric": "NDCG@10",
              "metrics": ["Recall", "NDCG", "Hit", "MRR"], "topk": [10], "train_time_budget": args.budget}
    records = compare(args.models.split(","), args.dataset, config_dict=config, output_dir=RESULTS, name=name)
    setup = (f"Dataset {args.dataset}; shared config: {config}; one process per model, 2 CPU threads.\n\n")
    report.write_comparison(records, args.dataset, RESULTS, name, preface=setup + reference_table(args.dataset, records))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
