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
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summary(records: list[dict]) -> str:
    by = {(r["model"], r["setting"]): r["result"]["test_result"] for r in records}
    lines = []
    full, held = by.get(("AlignSASRec", "backbone")), by.get(("AlignSASRec", "backbone_holdout"))
    for setting in ("stacked", "stacked_trained"):
        llm = by.get(("AlignLLMRec", setting))
        if llm and held:
            line = f"- AlignLLMRec {setting}: NDCG@10 {llm['ndcg@10']:.4f} = {llm['ndcg@10'] / max(held['ndcg@10'], 1e-9):.3f}x its holdout backbone"
            if full:
                line += f", {llm['ndcg@10'] / max(full['ndcg@10'], 1e-9):.3f}x the full backbone (goal >= 1.03x)"
            lines.append(line)
    return "\n".join(lines) + "\n\n"


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
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from recbole_llmalign import report
    from recbole_llmalign.quick_start import compare

    name = args.name or f"align_llmrec_stacking_{args.dataset.replace('-', '')}" + ("" if args.seed == 2020 else f"_seed{args.seed}")
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
