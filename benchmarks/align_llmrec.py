"""AlignLLMRec vs its frozen AlignSASRec backbone vs SASRec on one split, with ablations.

Rows (``setting``): SASRec (RecBole defaults, prefix augmentation, under a time budget);
AlignSASRec ``backbone`` (the AlignLLMRec default backbone recipe: ``backbone_epochs`` of
all_positions training, each user's last ``holdout_last_targets`` training targets held out); AlignLLMRec ``default`` (YAML defaults: the untrained model, which ranks
as the backbone, is validated first and kept when training does not beat it on valid) and, every
one on that same backbone checkpoint, the trained model itself without that selection
(``trained``) and its ablations, also reported as trained: ``no_layer_prefix``,
``no_instruction_prefix``, ``soft_only`` (soft tokens, no titles), ``titles_only`` (titles, no
soft item tokens), ``lora`` (LoRA r=8 on q/v projections). Metrics:
NDCG@10, Recall@10, HitRate@100 (``hit@100``), on all test users and on the cold slice (test item
with <= 5 training interactions). ``train_samples`` = samples AlignLLMRec trained on (with the
default stacking, the backbone's held-out last target per user; capped by ``train_sample_budget``).

    python benchmarks/align_llmrec.py --dataset=ml-100k
    python benchmarks/align_llmrec.py --dataset=ml-1m --skip-sasrec --backbone-epochs=15 --sample-budget=5000 --ablations=default,trained
    # finish a run that was cut short: rerun the missing settings on its backbone and merge its partial CSVs
    python benchmarks/align_llmrec.py --dataset=ml-100k --ablations=lora --backbone-checkpoint=saved/AlignSASRec-<time>.pth \
        --merge saved/bench_partial/align_llmrec_ml100k.csv saved/bench_partial/align_llmrec_ml100k_llm.csv
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

TRAINED = {"validate_before_training": False}  # report the trained model itself, not the selected start
ABLATIONS = {
    "default": {},
    "trained": TRAINED,
    "no_layer_prefix": {"use_layer_prefix": False, **TRAINED},
    "no_instruction_prefix": {"use_instruction_prefix": False, **TRAINED},
    "soft_only": {"prompt_mode": "soft", **TRAINED},
    "titles_only": {"prompt_mode": "titles", **TRAINED},
    "lora": {"lora_r": 8, **TRAINED},
}


def summary(records: list[dict]) -> str:
    """Ratios the issue asks for, computed from this run's records."""
    by = {(r["model"], r.get("setting", "default")): r for r in records}
    backbone, llm, sasrec = by.get(("AlignSASRec", "backbone")), by.get(("AlignLLMRec", "default")), by.get(("SASRec", "default"))
    lines = []
    if backbone and llm:
        b, a = backbone["result"]["test_result"], llm["result"]["test_result"]
        lines.append(f"- NDCG@10 AlignLLMRec / its backbone: {a['ndcg@10'] / max(b['ndcg@10'], 1e-9):.3f}x (goal >= 1.03x); "
                     f"HitRate@100 {a['hit@100']:.4f} vs {b['hit@100']:.4f}")
        samples, backbone_samples = llm["cost"]["extra"]["train_samples"], backbone["cost"]["extra"]["train_samples"]
        lines.append(f"- AlignLLMRec trained on {samples:.0f} samples = {samples / backbone_samples:.1%} of the backbone's "
                     f"{backbone_samples:.0f} training samples per epoch (goal <= 10%)")
    if sasrec and llm:
        s, a = sasrec["result"]["test_result"], llm["result"]["test_result"]
        lines.append(f"- NDCG@10 AlignLLMRec / SASRec: {a['ndcg@10'] / max(s['ndcg@10'], 1e-9):.2f}x")
    trained = by.get(("AlignLLMRec", "trained"))
    if backbone and trained:
        b, t = backbone["result"]["test_result"], trained["result"]["test_result"]
        lines.append(f"- trained AlignLLMRec (no selection of the start) / backbone, NDCG@10: {t['ndcg@10'] / max(b['ndcg@10'], 1e-9):.3f}x")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--baseline-budget", type=float, default=600, help="train_time_budget of SASRec, s")
    parser.add_argument("--backbone-epochs", type=int, default=None, help="default: AlignLLMRec.yaml's backbone_epochs")
    parser.add_argument("--sample-budget", type=float, default=None, help="train_sample_budget of AlignLLMRec (default: YAML)")
    parser.add_argument("--llm-epochs", type=int, default=None, help="epochs of AlignLLMRec (default: YAML)")
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated AlignLLMRec settings")
    parser.add_argument("--skip-sasrec", action="store_true")
    parser.add_argument("--backbone-checkpoint", default=None,
                        help="reuse this AlignSASRec checkpoint (no SASRec/backbone runs; combine with --merge)")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="long-form CSVs of earlier runs of this benchmark (e.g. one cut short) whose rows join the table")
    parser.add_argument("--name", default=None)
    parser.add_argument("--from-csv", action="store_true", help="only re-render the table from results/<name>.csv")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from recbole_llmalign import report
    from recbole_llmalign.config import Config
    from recbole_llmalign.quick_start import compare

    name = args.name or f"align_llmrec_{args.dataset.replace('-', '')}"
    if args.from_csv:
        dataset, records = report.records_from_csv(RESULTS / f"{name}.csv")
        report.write_comparison(records, dataset, RESULTS, name, preface=summary(records))
        print((RESULTS / f"{name}.md").read_text())
        return
    defaults = Config(model="AlignLLMRec", dataset=args.dataset)
    backbone_epochs = args.backbone_epochs or int(defaults["backbone_epochs"])
    shared = {"seed": 2020, "show_progress": False, "valid_metric": "NDCG@10", "metrics": ["Recall", "NDCG", "Hit"],
              "topk": [10, 100], "cold_item_threshold": 5, "text_cache_dir": f"saved/bench_text_cache_{args.dataset}"}
    llm_overrides = {key: value for key, value in (("train_sample_budget", args.sample_budget), ("epochs", args.llm_epochs))
                     if value is not None}
    setup = (f"Dataset {args.dataset}; seed 2020; leave-one-out full ranking; SASRec budget {args.baseline_budget:.0f} s; "
             f"backbone: AlignSASRec defaults, {backbone_epochs} epochs max (early stopping), each user's last "
             f"{defaults['holdout_last_targets']} training target(s) held out; AlignLLMRec: "
             f"AlignLLMRec.yaml defaults (llm_layers {defaults['llm_layers']}, {defaults['epochs']} epoch(s), sample budget "
             f"{llm_overrides.get('train_sample_budget', defaults['train_sample_budget'])}) {llm_overrides or ''}, "
             "every setting on the same frozen backbone checkpoint; one process per run, 2 CPU threads.\n\n")
    partial = Path("saved") / "bench_partial"
    records = []
    checkpoint = args.backbone_checkpoint
    if checkpoint is None:
        holdout = int(defaults["holdout_last_targets"] or 0)  # the automatic backbone's recipe: stacking holds these out
        first = [("AlignSASRec", "backbone", {"epochs": backbone_epochs, "holdout_last_targets": holdout})]
        if not args.skip_sasrec:
            first.insert(0, ("SASRec", "default", {"train_time_budget": args.baseline_budget}))
        records = compare(first, args.dataset, config_dict=shared, output_dir=partial, name=name)
        checkpoint = next(r for r in records if r["setting"] == "backbone")["cost"]["checkpoint"]
    llm_runs = [("AlignLLMRec", setting, {**ABLATIONS[setting], **llm_overrides, "backbone_checkpoint": checkpoint})
                for setting in args.ablations.split(",")]
    records += compare(llm_runs, args.dataset, config_dict=shared, output_dir=partial, name=f"{name}_llm")
    if args.merge:
        merged: dict[tuple[str, str], dict] = {}
        for csv_path in args.merge:
            merged.update({(r["model"], r["setting"]): r for r in report.records_from_csv(Path(csv_path))[1]})
        merged.update({(r["model"], r["setting"]): r for r in records})
        records = list(merged.values())
    report.write_comparison(records, args.dataset, RESULTS, name, preface=setup + summary(records))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
