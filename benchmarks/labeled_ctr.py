"""Labeled (pointwise) protocol on ml-1m-ctr: AlignLLMRecCTR's yes/no head vs RecBole's CTR models.

Split and labels from the plugin's ml-1m-ctr YAML (CoLLM / SeLLa-Rec protocol): label = rating >= 4,
one global time-ordered 80/10/10 split of all interactions, 5-core. Rows: LR, FM, DeepFM (RecBole
context-aware models on user, item, title, year and genre features), DIN (RecBole, attention over
the user's history), AlignSASRec used as a scorer (dot product of its sequence and item vectors),
and AlignLLMRecCTR on that AlignSASRec as its frozen backbone, alone or (``fm_*`` settings) with the run's FM
as its frozen CTR scorer (``ctr_scorer_checkpoint``) (tables written before that model
had its own class name it AlignLLMRec with ``task: labeled``; ``--merge`` reads both). Metrics: AUC and
UAUC on the whole test set, on warm candidates and on cold ones (<= 5 training interactions).
``--users`` keeps a random subset of users (all their ratings) so the LLM's per-pair scoring of
the validation and test sets fits a CPU budget.

    python benchmarks/labeled_ctr.py --users=1000 --llm-samples=5000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CTR_YAML = Path(__file__).resolve().parents[1] / "recbole_llmalign" / "properties" / "dataset" / "ml-1m-ctr.yaml"


def auc_table(records: list[dict]) -> str:
    header = ["model", "setting", "test AUC", "test UAUC", "warm AUC", "warm UAUC", "cold AUC", "cold UAUC",
              "warm / cold pairs", "s/epoch", "epochs", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        result, cost = record["result"], record["cost"]
        test, warm, cold = (result.get(k) or {} for k in ("test_result", "test_warm_result", "test_cold_result"))
        cell = lambda d, k: f"{d[k]:.4f}" if k in d else "-"  # noqa: E731
        lines.append("| " + " | ".join([
            record["model"], record["setting"], cell(test, "auc"), cell(test, "uauc"), cell(warm, "auc"), cell(warm, "uauc"),
            cell(cold, "auc"), cell(cold, "uauc"), f"{warm.get('n_users', 0):.0f} / {cold.get('n_users', 0):.0f}",
            f"{cost.get('sec_per_epoch', 0):.1f}", f"{cost.get('epochs', 0)}", f"{cost.get('eval_sec', 0):.0f}"]) + " |")
    return "\n".join(lines) + "\n\n"


LLM_MODELS = ("AlignLLMRecCTR", "AlignLLMRec")  # the second: rows of tables written before AlignLLMRecCTR


def summary(records: list[dict]) -> str:
    """The issue's goals per LLM row: AUC over the best baseline, UAUC against FM's, and what the LLM pass adds over its
    own ablation without it (the same terms, no LLM: ``rates_only`` for ``labeled``, ``fm_rates_only`` for ``fm_labeled``)."""
    baselines = [r for r in records if r["model"] in ("LR", "FM", "DeepFM", "DIN", "AlignSASRec")]
    rows = {r["setting"]: r for r in records if r["model"] in LLM_MODELS}
    if not rows or not baselines:
        return ""
    best = max(baselines, key=lambda r: r["result"]["test_result"]["auc"])
    fm = next((r for r in baselines if r["model"] == "FM"), None)
    lines = []
    for setting, ablation in (("labeled", "rates_only"), ("fm_labeled", "fm_rates_only")):
        if setting not in rows:
            continue
        test = rows[setting]["result"]["test_result"]
        line = (f"- AlignLLMRec `{setting}` test AUC {test['auc']:.4f} vs best baseline {best['model']} "
                f"{best['result']['test_result']['auc']:.4f}: {test['auc'] - best['result']['test_result']['auc']:+.4f} (goal >= +0.01)")
        if fm:
            line += f"; test UAUC {test['uauc']:.4f} vs FM {fm['result']['test_result']['uauc']:.4f} (goal >= FM's)"
        lines.append(line)
        if ablation in rows:
            deltas = []
            for split, key in (("test", "test_result"), ("cold", "test_cold_result")):
                a, b = rows[setting]["result"].get(key) or {}, rows[ablation]["result"].get(key) or {}
                deltas += [f"{split} {metric.upper()} {a[metric] - b[metric]:+.4f}" for metric in ("auc", "uauc")
                           if metric in a and metric in b]
            lines.append(f"- what the LLM pass adds (`{setting}` - `{ablation}`, goal >= +0.01 AUC and UAUC): " + ", ".join(deltas))
    return "\n".join(lines) + "\n\n"


def run(args: argparse.Namespace, name: str, data_root: Path, table: str, compare: Any) -> list[dict]:
    """Train and evaluate every requested model on the prepared dataset ``name``; returns the records."""
    from recbole_llmalign import report

    shared = {"data_path": str(data_root), "seed": 2020, "epochs": 300, "stopping_step": 5, "show_progress": False,
              "train_neg_sample_args": None, "train_time_budget": args.baseline_budget, "MAX_ITEM_LIST_LENGTH": 50,
              "cold_item_threshold": 5}
    wanted = [m for m in args.models.split(",") if m]
    runs = [(m, "default", {}) for m in wanted if m not in ("AlignSASRec", *LLM_MODELS)]
    records = compare(runs, name, [str(CTR_YAML)], config_dict=shared, output_dir=RESULTS, name=table) if runs else []
    backbone = None
    if "AlignSASRec" in wanted:
        scorer = compare([("AlignSASRec", "scorer", {})], name, [str(CTR_YAML)], config_dict=shared,
                         output_dir=RESULTS, name=table + "_partial")
        records += scorer
        backbone = scorer[0]["cost"].get("checkpoint")
    if "AlignLLMRecCTR" in wanted:
        llm = {"llm_layers": args.llm_layers, "train_sample_budget": args.llm_samples,
               "train_time_budget": None, "eval_batch_size": 256, "epochs": args.llm_epochs}
        if backbone:
            llm["backbone_checkpoint"] = backbone
        settings = {"labeled": {}, "no_history_labels": {"history_label_words": None, "label_rate_features": False},
                    "rates_only": {"answer_from_llm": False}}
        chosen = args.llm_settings.split(",")
        if any(setting.startswith("fm_") for setting in chosen):  # FM of this run as the frozen CTR scorer
            fm = next((r for r in records if r["model"] == "FM"), None)
            if fm is None or not fm["cost"].get("checkpoint"):
                raise SystemExit("--llm-settings fm_labeled / fm_rates_only read the FM this run trains: add FM to --models.")
            for setting in ("labeled", "rates_only"):
                settings[f"fm_{setting}"] = {**settings[setting], "ctr_scorer_checkpoint": fm["cost"]["checkpoint"]}
        records += compare([("AlignLLMRecCTR", setting, {**llm, **settings[setting]}) for setting in chosen],
                           name, [str(CTR_YAML)], config_dict=shared, output_dir=RESULTS, name=table + "_partial")
    for suffix in (".md", ".csv", ".png"):
        (RESULTS / f"{table}_partial{suffix}").unlink(missing_ok=True)
    if args.merge:
        merged = {(r["model"], r["setting"]): r for r in report.records_from_csv(Path(args.merge))[1]}
        merged.update({(r["model"], r["setting"]): r for r in records})
        records = list(merged.values())
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="random users kept (0 = all 6,040)")
    parser.add_argument("--baseline-budget", type=float, default=300, help="train_time_budget of every non-LLM model, s")
    parser.add_argument("--llm-samples", type=float, default=5000, help="AlignLLMRec train_sample_budget (count or fraction)")
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--llm-epochs", type=int, default=1)
    parser.add_argument("--models", default="LR,FM,DeepFM,DIN,AlignSASRec,AlignLLMRecCTR")
    parser.add_argument("--llm-settings", default="labeled,no_history_labels",
                        help="AlignLLMRec rows: labeled (YAML defaults), no_history_labels (history unmarked, no like-rate "
                             "features), rates_only (like rates and backbone score, no LLM pass); fm_labeled and "
                             "fm_rates_only: the same with this run's FM as ctr_scorer_checkpoint (its logit starts the score)")
    parser.add_argument("--merge", default=None, metavar="CSV",
                        help="add this run's rows to an earlier run's CSV of the same table (rows of the same model and setting are replaced)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--from-csv", action="store_true", help="only re-render the table from results/<name>.csv")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from subsample import subsample_users

    from recbole_llmalign import report
    from recbole_llmalign.data.datasets import materialize_ml1m
    from recbole_llmalign.quick_start import compare

    data_root = Path("dataset")
    table = args.name or f"labeled_ctr_ml1m{'_u' + str(args.users) if args.users else ''}"
    if args.from_csv:
        name, records = report.records_from_csv(RESULTS / f"{table}.csv")
    else:
        materialize_ml1m(data_root / "ml-1m-ctr", "ml-1m-ctr")
        name = subsample_users(data_root / "ml-1m-ctr", "ml-1m-ctr", args.users, 2020, data_root) if args.users else "ml-1m-ctr"
        records = run(args, name, data_root, table, compare)
    setup = (f"Dataset {name} ({args.users or 'all'} random users of ml-1m-ctr, all their ratings): label = rating >= 4, "
             "5-core, global time-ordered 80/10/10 split, labeled evaluation. Non-LLM models: RecBole defaults, "
             f"{args.baseline_budget:.0f} s budget, early stopping 5 on valid AUC; AlignSASRec trained on the same "
             f"sequences (all_positions, its CE next-item loss) and scored by dot product; AlignLLMRec: SmolLM2-135M first "
             f"{args.llm_layers} layers, yes/no head, {args.llm_samples:g} training pairs, {args.llm_epochs} epoch(s); `labeled` marks each "
             "history item liked/disliked and adds the user's and the candidate's smoothed like rates, `no_history_labels` "
             "does neither, `rates_only` scores with the like rates and the backbone's dot product alone (no LLM pass); `fm_labeled` and "
             "`fm_rates_only` are `labeled` and `rates_only` with this run's FM as `ctr_scorer_checkpoint` (frozen; its logit, "
             "weight starting at 1, starts the score; the like-rate weights start at 0). Warm / cold: test "
             f"candidates with more than / at most 5 training interactions; {os.environ.get('OMP_NUM_THREADS', '2')} CPU threads.\n\n")
    report.write_comparison(records, name, RESULTS, table, preface=setup + summary(records) + auc_table(records))
    print((RESULTS / f"{table}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
