"""One leaderboard per dataset: the standard model set under one config and one seed set.

Rows (model, setting): Pop, GRU4Rec, SASRec, BERT4Rec (RecBole, item ids only), SASRecF and FDSA
(RecBole, item features = the dataset YAML's ``selected_features``, its short token fields),
AlignSASRec ``default`` (ids + item text) and ``id_only`` (plain SASRec items, no alignment loss,
all-positions training: "SASRec, original all-positions training"), AlignLLMRec and AlignGenRec (a
frozen AlignSASRec backbone trained first with the same settings, then SmolLM2-135M), and AlignLLMRec
``no_llm`` (its LLM ablation: the same samples, prompt embeddings and head, an MLP instead of the
LLM). LLM rows also report their own (holdout) backbone's test metrics on the same users.

Every row trains to early stopping (``stopping_step`` on valid NDCG@10) unless the wall-clock
budget binds, which is the same for every non-LLM row; each row says which (``stopped_by``) and
its budget. Time-ordered leave-one-out, full ranking. Columns: test / test_cold / test_new NDCG@10,
Recall@10, HR@5 (mean ± std over seeds), the paired-bootstrap NDCG@10 difference to SASRec (95%
interval, pooled over seeds; ``--reference=SASRec,AlignSASRec``: a column per reference), s/epoch,
epochs, stopped_by, peak memory. Runs are resumable: rerun
the same command after a crash or with more ``--models`` / ``--seeds`` and finished runs are kept
(``--fresh`` starts over; ``--rerun=AlignLLMRec,...`` trains the named runs again and keeps the
rest). Per-user test metrics go to ``saved/leaderboard/<name>/`` (not results/).

    python benchmarks/leaderboard.py --dataset=amazon-office --seeds=2020,2021,2022
    python benchmarks/leaderboard.py --dataset=amazon-office --seeds=2020,2021,2022 --new-item-ratio=0.1
    python benchmarks/leaderboard.py --dataset=ml-100k --seeds=2020,2021,2022
    python benchmarks/leaderboard.py --dataset=amazon-games --budget=1800
    # a quick look on a user subsample (named -u<N> in the results)
    python benchmarks/leaderboard.py --dataset=amazon-office --users=200 --models=Pop,SASRec --seeds=2020,2021 --epochs=2

Writes ``benchmarks/results/leaderboard_<dataset>[-u<N>][_new<ratio>].{md,csv,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
PLUGIN_DATASET_YAML = Path(__file__).resolve().parents[1] / "recbole_llmalign" / "properties" / "dataset"
DATASETS = ("amazon-office", "amazon-games", "ml-100k", "ml-1m")

ID_ONLY = {"item_representation": "id", "seq_text_align_weight": 0.0, "id_text_align_weight": 0.0}  # as align_sasrec.py
# (run id, model, setting, overrides): the standard set, in table order
STANDARD = [
    ("Pop", "Pop", "default", {"train_neg_sample_args": None}),  # RecBole's Pop counts sampled negatives as interactions
    ("GRU4Rec", "GRU4Rec", "default", {}),
    ("SASRec", "SASRec", "default", {}),
    ("BERT4Rec", "BERT4Rec", "default", {}),
    # RecBole pickles these models' feature layer, with the whole dataset, into their checkpoint, which the allowlist
    # refuses; the file is the one this same run wrote moments before, so it is loaded as trusted.
    ("SASRecF", "SASRecF", "default", {"trust_checkpoint": True}),
    ("FDSA", "FDSA", "default", {"trust_checkpoint": True}),
    ("AlignSASRec", "AlignSASRec", "default", {}),
    ("AlignSASRec:id_only", "AlignSASRec", "id_only", ID_ONLY),
    ("AlignLLMRec", "AlignLLMRec", "default", {}),
    ("AlignLLMRec:no_llm", "AlignLLMRec", "no_llm", {"prompt_reader": "mlp"}),  # the LLM ablation (same samples and head)
    ("AlignGenRec", "AlignGenRec", "default", {}),
]
# AlignLLMRec levers (issue: the LLM earns its cost): named variants, run only when --models names them
LEVERS = [
    # items the training split never shows as negatives of every training step (plain SASRec's; the default before)
    ("AlignSASRec:unseen_negatives", "AlignSASRec", "unseen_negatives", {"unseen_items": "negatives"}),
    # the holdout backbone continued on every training target (5 epochs at most) ranks valid/test under the LLM's residual
    ("AlignLLMRec:refit_5", "AlignLLMRec", "refit_5", {"backbone_refit_epochs": 5}),
    ("AlignLLMRec:no_llm_refit_5", "AlignLLMRec", "no_llm_refit_5", {"backbone_refit_epochs": 5, "prompt_reader": "mlp"}),
    # cross-fitting: two fold backbones, each without half the users; every training target is an honest sample, a fresh
    # draw of train_sample_budget (0.1) of them each epoch (amazon-office: as many per epoch as the default's held-out ones)
    ("AlignLLMRec:cross_fit_2", "AlignLLMRec", "cross_fit_2", {"cross_fit_folds": 2, "resample_each_epoch": True}),
    ("AlignLLMRec:no_llm_cross_fit_2", "AlignLLMRec", "no_llm_cross_fit_2",
     {"cross_fit_folds": 2, "resample_each_epoch": True, "prompt_reader": "mlp"}),
    # cross-fitting evaluated as trained: each user ranked by the fold backbone that never saw them (5 folds: each
    # fold backbone sees 80% of the users), so the LLM's inputs at evaluation come from the backbones it learned on
    ("AlignLLMRec:cross_fit_5_folds", "AlignLLMRec", "cross_fit_5_folds",
     {"cross_fit_folds": 5, "cross_fit_evaluation": "folds", "resample_each_epoch": True}),
    ("AlignLLMRec:no_llm_cross_fit_5_folds", "AlignLLMRec", "no_llm_cross_fit_5_folds",
     {"cross_fit_folds": 5, "cross_fit_evaluation": "folds", "resample_each_epoch": True, "prompt_reader": "mlp"}),
    # the no_llm row's very MLP with the LLM's last state added: the LLM can only add, and no_llm is its exact ablation
    ("AlignLLMRec:llm_plus_mlp", "AlignLLMRec", "llm_plus_mlp", {"prompt_reader": "llm+mlp"}),
    # llm_plus_mlp's control: the same MLP plus a constant (the initial LLM's mean state): is its gain the LLM's reading?
    ("AlignLLMRec:const_plus_mlp", "AlignLLMRec", "const_plus_mlp", {"prompt_reader": "const+mlp"}),
    ("AlignLLMRec:llm_items", "AlignLLMRec", "llm_items", {"llm_item_scoring": True}),
    ("AlignLLMRec:no_llm_items", "AlignLLMRec", "no_llm_items", {"llm_item_scoring": True, "prompt_reader": "mlp"}),
    ("AlignLLMRec:lr_1e-3", "AlignLLMRec", "lr_1e-3", {"learning_rate": 0.001}),
    ("AlignLLMRec:no_llm_lr_1e-3", "AlignLLMRec", "no_llm_lr_1e-3", {"learning_rate": 0.001, "prompt_reader": "mlp"}),
    # more honest samples: the backbone holds out each user's last 5 training targets (5x the stacking samples)
    ("AlignLLMRec:holdout_5_lr_1e-3", "AlignLLMRec", "holdout_5_lr_1e-3", {"holdout_last_targets": 5, "learning_rate": 0.001}),
    ("AlignLLMRec:no_llm_holdout_5_lr_1e-3", "AlignLLMRec", "no_llm_holdout_5_lr_1e-3",
     {"holdout_last_targets": 5, "learning_rate": 0.001, "prompt_reader": "mlp"}),
    # candidate-aware: the LLM re-scores the backbone's top 5, one prompt per (user, candidate): 5x the LLM passes; it
    # trains on the samples whose answer is in that top 5, so on the 5 held-out targets per user of the lever above
    ("AlignLLMRec:rerank_5_holdout_5_lr_1e-3", "AlignLLMRec", "rerank_5_holdout_5_lr_1e-3",
     {"rerank_top_n": 5, "holdout_last_targets": 5, "learning_rate": 0.001}),
    ("AlignLLMRec:no_llm_rerank_5_holdout_5_lr_1e-3", "AlignLLMRec", "no_llm_rerank_5_holdout_5_lr_1e-3",
     {"rerank_top_n": 5, "holdout_last_targets": 5, "learning_rate": 0.001, "prompt_reader": "mlp"}),
    # depth and adapters: all 30 of SmolLM2's layers (the default keeps 8) with LoRA r 8 on q/v; the twin's MLP takes the
    # trainable size of these prefixes and adapters, so it is the same ablation at this depth
    ("AlignLLMRec:layers_30_lora_8", "AlignLLMRec", "layers_30_lora_8", {"llm_layers": None, "lora_r": 8}),
    ("AlignLLMRec:no_llm_layers_30_lora_8", "AlignLLMRec", "no_llm_layers_30_lora_8",
     {"llm_layers": None, "lora_r": 8, "prompt_reader": "mlp"}),
]
ALL_RUNS = STANDARD + LEVERS
FEATURE_MODELS = ("SASRecF", "FDSA")
LLM_MODELS = ("AlignLLMRec", "AlignGenRec")


def source_folder(dataset: str, data_root: Path) -> Path:
    """Folder holding the dataset's atomic files, found or built exactly as a run finds them."""
    import recbole

    from recbole_llmalign.config import Config
    from recbole_llmalign.data import prepare_dataset

    if dataset == "ml-100k":  # RecBole's wheel ships it
        return Path(recbole.__file__).resolve().parent / "dataset_example" / "ml-100k"
    config = Config(model="Pop", dataset=dataset, config_dict={"data_path": str(data_root), "state": "ERROR"})
    prepare_dataset(config)
    return Path(config["data_path"])


def field_use(name: str, config_files: list[str] | None, data_config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(note per run id, run ids that cannot run): which item fields each model reads, and why not the others."""
    from recbole_llmalign.config import Config
    from recbole_llmalign.data import prepare_dataset
    from recbole_llmalign.data.datasets import _atomic_header

    config = Config(model="SASRecF", dataset=name, config_file_list=config_files, config_dict={**data_config, "state": "ERROR"})
    prepare_dataset(config)  # where the run will read the files from
    item_file = Path(config["data_path"]) / f"{name}.item"
    header = _atomic_header(item_file) if item_file.is_file() else {}
    loaded = set((config["load_col"] or {}).get("item", []))
    numerical = set(config["numerical_features"] or [])
    usable, refused = [], []
    for field in config["selected_features"] or []:
        kind = header.get(field)
        if kind is None:
            refused.append(f"{field} (no such field in {item_file.name})")
        elif field not in loaded:
            refused.append(f"{field} (not in load_col)")
        elif kind.startswith("float") and field not in numerical:
            refused.append(f"{field} ({kind}: RecBole embeds a float field only when listed in numerical_features)")
        else:
            usable.append(field)
    others = [f"{f} ({'whole text' if k == 'token_seq' else k})" for f, k in header.items()
              if f != config["ITEM_ID_FIELD"] and f not in usable and f not in (config["selected_features"] or [])]
    text_fields = list(config["item_text_fields"] or [])
    limits = config["item_text_field_words"] or {}
    text = ", ".join(f"{f} (first {limits[f]} words)" if f in limits else f for f in text_fields) or "none"
    feature_note = f"item features {', '.join(usable)}" if usable else "no short token field in selected_features"
    feature_note += "".join(f"; cannot use {r}" for r in refused) + (f"; not used: {', '.join(others)}" if others else "")
    notes = {
        "Pop": "item ids only (training counts)", "GRU4Rec": "item ids only", "SASRec": "item ids only",
        "BERT4Rec": "item ids only", "SASRecF": feature_note, "FDSA": feature_note,
        "AlignSASRec": f"ids + text: {text}", "AlignSASRec:id_only": "item ids only; SASRec, original all-positions training",
        "AlignLLMRec": f"frozen AlignSASRec (ids + text) + SmolLM2-135M; {text_fields[0] if text_fields else 'no'} text in the prompt",
        "AlignLLMRec:no_llm": "the LLM ablation: the same samples, prompt embeddings and head, read by an MLP of the prefixes' "
                              "trainable size instead of the LLM",
        "AlignSASRec:unseen_negatives": f"ids + text: {text}; items training never shows are negatives of every step "
                                        "(unseen_items: negatives, plain SASRec's training)",
        "AlignLLMRec:refit_5": "backbone_refit_epochs 5: trained on the holdout backbone, evaluated with it continued on every "
                               "training target (own backbone = that refit)",
        "AlignLLMRec:no_llm_refit_5": "no_llm, backbone_refit_epochs 5",
        "AlignLLMRec:cross_fit_2": "cross_fit_folds 2: every training target a sample, scored by the fold backbone that never "
                                   "saw its user (a fresh 0.1 draw each epoch); evaluated with the backbone trained on every user",
        "AlignLLMRec:no_llm_cross_fit_2": "no_llm, cross_fit_folds 2",
        "AlignLLMRec:cross_fit_5_folds": "cross_fit_folds 5 and cross_fit_evaluation folds: trained as cross_fit_2, and valid/"
                                         "test rank each user with the fold backbone that never saw them (own backbone = those "
                                         "5 fold backbones, each trained on 80% of the users)",
        "AlignLLMRec:no_llm_cross_fit_5_folds": "no_llm, cross_fit_folds 5, cross_fit_evaluation folds",
        "AlignLLMRec:llm_plus_mlp": "prompt_reader llm+mlp: the no_llm row's MLP (same size and initial weights) plus the "
                                    "LLM's last state, prefixes and all; its ablation is the no_llm row",
        "AlignLLMRec:const_plus_mlp": "prompt_reader const+mlp: llm_plus_mlp's control, the same MLP plus one constant "
                                      "vector (the initial LLM's mean state over its first micro-batch; nothing of the LLM "
                                      "trains)",
        "AlignLLMRec:llm_items": "+ llm_item_scoring: the LLM's vector of each item's title in the score",
        "AlignLLMRec:no_llm_items": "no_llm + llm_item_scoring (the titles' input embeddings, no LLM layers)",
        "AlignLLMRec:lr_1e-3": "learning_rate 1e-3 (default 1e-4)",
        "AlignLLMRec:no_llm_lr_1e-3": "no_llm, learning_rate 1e-3",
        "AlignLLMRec:holdout_5_lr_1e-3": "holdout_last_targets 5 (its own backbone holds out 5 targets per user: 5x the "
                                         "samples), learning_rate 1e-3",
        "AlignLLMRec:no_llm_holdout_5_lr_1e-3": "no_llm, holdout_last_targets 5, learning_rate 1e-3",
        "AlignLLMRec:rerank_5_holdout_5_lr_1e-3": "rerank_top_n 5: the LLM re-scores the backbone's top 5 with one "
                                                  "candidate prompt each; holdout_last_targets 5, learning_rate 1e-3",
        "AlignLLMRec:no_llm_rerank_5_holdout_5_lr_1e-3": "no_llm, rerank_top_n 5, holdout_last_targets 5, learning_rate 1e-3",
        "AlignLLMRec:layers_30_lora_8": "llm_layers ~ (all 30 of SmolLM2's layers; default 8) and lora_r 8 on q_proj, v_proj",
        "AlignLLMRec:no_llm_layers_30_lora_8": "no_llm at that depth: its MLP has the trainable size of 30 layers' prefixes "
                                               "and LoRA r 8",
        "AlignGenRec": f"item codes from AlignSASRec + text ({text}); SmolLM2-135M",
    }
    blocked = [] if usable else list(FEATURE_MODELS)
    for run in blocked:
        notes[run] = f"not run: {feature_note}"
    if not text_fields:
        notes["AlignSASRec"] = "ids only here: the dataset has no item text"
    return notes, blocked


def table_name(dataset: str, users: int, ratio: float) -> str:
    name = f"leaderboard_{dataset}" + (f"-u{users}" if users else "")
    return name + (f"_new{ratio:g}" if ratio else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-office", choices=DATASETS)
    parser.add_argument("--users", type=int, default=0, help="random users kept (seed 2020, the same for every run); 0 = all")
    parser.add_argument("--new-item-ratio", type=float, default=0.0, help="new_item_ratio (0 = protocol off)")
    parser.add_argument("--seeds", default="2020", help="comma-separated seeds; every model runs once per seed")
    parser.add_argument("--models", default=",".join(run for run, *_ in STANDARD),
                        help="comma list of run ids from: " + ", ".join(run for run, *_ in ALL_RUNS)
                        + " (the levers only when named)")
    parser.add_argument("--reference", default="SASRec",
                        help="model (or Model:setting) every other row is tested against; comma list; the first is the primary "
                        "(the ndcg@10_diff rows), each further R adds ndcg@10_diff_vs_R rows, a column and a table")
    parser.add_argument("--epochs", type=int, default=300, help="epoch cap of every non-LLM row (and of the LLM rows' backbone)")
    parser.add_argument("--stopping-step", type=int, default=10, help="RecBole's stopping_step (validations without gain)")
    parser.add_argument("--budget", type=float, default=None,
                        help="train_time_budget of every row (the LLM rows' backbone and LLM training alike), s (default: none)")
    parser.add_argument("--llm-epochs", type=int, default=3, help="epochs of AlignLLMRec / AlignGenRec (their YAML default: 3)")
    parser.add_argument("--llm-layers", type=int, default=None, help="llm_layers of the LLM rows (default: their YAML's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (YAML value); repeatable")
    parser.add_argument("--rerun", default="",
                        help="comma list of run ids (as --models) trained again although the results CSV has them "
                        "(after a fix that changes them); every other finished run is kept")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing results CSV")
    parser.add_argument("--name", default=None, help="results name (default leaderboard_<dataset>[-u<N>][_new<ratio>])")
    args = parser.parse_args()
    known = {run for run, *_ in ALL_RUNS}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(chosen) - known:
        parser.error(f"unknown --models {sorted(set(chosen) - known)}; choose from {sorted(known)}")
    rerun = {m.strip() for m in args.rerun.split(",") if m.strip()}
    if rerun - set(chosen):
        parser.error(f"--rerun {sorted(rerun - set(chosen))} must also be in --models")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from subsample import subsample_users

    from recbole_llmalign.quick_start import compare

    data_root = Path("dataset")
    source = source_folder(args.dataset, data_root)
    name = subsample_users(source, args.dataset, args.users, 2020, data_root) if args.users else args.dataset
    config_files = [str(PLUGIN_DATASET_YAML / f"{args.dataset}.yaml")] if args.users else None
    table = args.name or table_name(args.dataset, args.users, args.new_item_ratio)
    data_config = {"data_path": str(data_root)} if args.users or args.dataset != "ml-100k" else {}  # ml-100k: RecBole's copy
    notes, blocked = field_use(name, config_files, data_config)
    shared = {**data_config, "epochs": args.epochs, "stopping_step": args.stopping_step, "eval_step": 1,
              "show_progress": False, "valid_metric": "NDCG@10", "metrics": ["Recall", "NDCG", "Hit"], "topk": [5, 10],
              "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
              "cold_item_threshold": 5, "train_time_budget": args.budget, "new_item_ratio": args.new_item_ratio or None,
              **overrides}
    llm = {"epochs": args.llm_epochs, "eval_step": args.llm_epochs, "backbone_epochs": args.epochs,
           **({"llm_layers": args.llm_layers} if args.llm_layers else {})}
    runs = [(model, setting, {**extra, **(llm if model in LLM_MODELS else {})})
            for run, model, setting, extra in ALL_RUNS if run in chosen and run not in blocked]
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    table_seeds = set(seeds)  # the preface names every seed of the table: this call's and the kept runs'
    if not args.fresh and (RESULTS / f"{table}.csv").is_file():
        from recbole_llmalign.report import records_from_csv

        table_seeds |= {r["seed"] for r in records_from_csv(RESULTS / f"{table}.csv")[1] if r["seed"] is not None}
    ratio = args.new_item_ratio
    preface = (
        f"Dataset {name}" + (f" ({args.users} random users of {args.dataset}, all their interactions)" if args.users else "")
        + f"; time-ordered leave-one-out, full ranking; seeds {', '.join(map(str, sorted(table_seeds)))} (mean ± sample std over "
        "the seeds each row ran: its `seeds` column). "
        f"Non-LLM rows (and the LLM rows' AlignSASRec backbone): up to {args.epochs} epochs, early stopping after "
        f"{args.stopping_step} validations without a better valid NDCG@10. LLM rows: {args.llm_epochs} epochs, validated "
        f"after the last. train_time_budget of every run: {f'{args.budget:.0f} s' if args.budget else 'none'}. Cold slice: "
        f"test item with <= 5 training interactions. " + (
            f"New-item protocol on: {ratio:g} of the items (drawn per seed) lose every training interaction, as target "
            "and as input (training histories rebuilt without them); they stay valid/test targets and may appear in "
            "valid/test histories; `new` = users whose test item is new. " if ratio else "New-item protocol off. ")
        + f"Model defaults otherwise (RecBole's and the plugin's YAML); one process per run, {threads} CPU threads (the runs of "
        "the last call; where rows ran with other counts a `threads` column shows each row's, `-` = not recorded)"
        + (f"; every run with {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else "") + ".\n\n"
        + "".join(f"{run}: {notes[run]}.\n\n" for run in chosen if run in blocked))
    compare(runs, name, config_files, config_dict=shared, output_dir=RESULTS, name=table, seeds=seeds, reference=args.reference,
            per_user_dir=Path("saved") / "leaderboard" / table, resume=not args.fresh, keep_going=True,
            rerun=[(model, setting) for run, model, setting, _ in ALL_RUNS if run in rerun],
            table={"preface": preface, "metrics": ["ndcg@10", "recall@10", "hit@5"],
                   "slice_metrics": ["ndcg@10", "recall@10", "hit@5"],
                   "notes": {(model, setting): notes[run] for run, model, setting, _ in ALL_RUNS}})
    print((RESULTS / f"{table}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
