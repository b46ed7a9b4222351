"""RecBole's SASRec, GRU4Rec, BERT4Rec and Pop on ml-100k through the plugin, side by side.

Same config and seed for all (RecBole's defaults: embedding 64, MAX_ITEM_LIST_LENGTH 50, CE
loss), 5 epochs each. Writes benchmarks/results/compare_ml100k.{md,csv,png}.

    python benchmarks/compare_ml100k.py            # about 40 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="SASRec,GRU4Rec,BERT4Rec,Pop")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--name", default="compare_ml100k")
    args = parser.parse_args()

    from recbole_llmalign.quick_start import compare

    config = {"epochs": args.epochs, "seed": 2020, "show_progress": False, "valid_metric": "NDCG@10",
              "metrics": ["Recall", "NDCG", "Hit", "MRR"], "topk": [10]}
    compare(args.models.split(","), "ml-100k", config_dict=config, output_dir=RESULTS, name=args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
