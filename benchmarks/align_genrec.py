"""AlignGenRec vs SASRec vs AlignSASRec on one split, with tokenizer report, beam-search and cache-lookup cost.

Rows (``setting``): SASRec (RecBole defaults, prefix augmentation, time budget), AlignSASRec
``default`` (all_positions), AlignGenRec ``default`` and its ablations ``no_llm_align`` (item
tokenizer without the loss that aligns codes to the LLM's title embeddings) and ``levels3``
(L = 3 instead of 4); named with ``--ablations``: each task left out (``no_sequential``,
``no_text_align``, ``no_query``, ``no_negative``), ``no_user_token``, and ``scratch``, the same
code model with fresh weights, all trained (the TIGER-style baseline); the lever ``resample`` (a fresh
sample-budget subset every epoch). Metrics: HR@5, NDCG@5, HR@10, NDCG@10 (full ranking; generated items get
their beam log-probability, the rest a floor). Users may be subsampled (``--users``) so the LLM's
training and per-user beam search fit a CPU budget; every model sees the same subsample and split.

After the runs, the default AlignGenRec checkpoint writes every user's top-10 to a verified cache
file and 10,000 random lookups are timed (p50/p99).

    python benchmarks/align_genrec.py --dataset=amazon-games --users=2000
    python benchmarks/align_genrec.py --dataset=ml-1m --users=1000 --budget=0.1 --ablations=default
    # to convergence, validated every epoch (the CSV's valid_curve rows and the curve table show the plateau)
    python benchmarks/align_genrec.py --dataset=amazon-office --users=0 --budget=0.2 --llm-epochs=10 --eval-step=1 --ablations=default
    # a further setting on the backbone of that run (its log names the AlignSASRec checkpoint), in its own table
    python benchmarks/align_genrec.py --dataset=amazon-office --users=0 --budget=0.1 --llm-epochs=10 --eval-step=1 \
        --llm-stopping-step=2 --skip-baselines --backbone-checkpoint=saved/AlignSASRec-<time>.pth --ablations=resample \
        --merge=align_genrec_amazonoffice --reference=AlignGenRec --name=align_genrec_amazonoffice_resample
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

TASKS = {"sequential": 1.0, "title_to_code": 0.15, "code_to_title": 0.15, "query": 0.1, "negative": 0.2}  # AlignGenRec.yaml
ABLATIONS = {  # --ablations: default, no_llm_align, levels3 unless named
    "default": {},
    "no_llm_align": {"codebook_llm_align_weight": 0.0},  # item tokenizer without the pull towards the LLM's title embedding
    "levels3": {"codebook_levels": 3},
    # each task left out of the mixture (the text alignment task is its two directions)
    "no_sequential": {"task_weights": {**TASKS, "sequential": 0.0}},
    "no_text_align": {"task_weights": {**TASKS, "title_to_code": 0.0, "code_to_title": 0.0}},
    "no_query": {"task_weights": {**TASKS, "query": 0.0}},
    "no_negative": {"task_weights": {**TASKS, "negative": 0.0}},
    "no_user_token": {"use_user_token": False},
    # the TIGER-style baseline: the same code model with fresh weights, all trained (what the pretrained LLM gives)
    "scratch": {"llm_init": "scratch", "lora_r": 0},
    # a lever, not an ablation: a fresh train_sample_budget subset every epoch instead of one subset for all epochs
    "resample": {"resample_each_epoch": True},
}
DEFAULT_ABLATIONS = "default,no_llm_align,levels3"

PLUGIN_DATASET_YAML = Path(__file__).resolve().parents[1] / "recbole_llmalign" / "properties" / "dataset"
DATASETS = {  # per dataset: settings its plugin YAML would give (subsamples get another name, so they are passed here)
    "amazon-games": {"load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
                     "item_text_fields": ["title"]},
    "ml-1m": {},  # the plugin's ml-1m.yaml (RecBole's benchmark protocol: ratings >= 3, 10-core) is passed as a file
    "amazon-office": {},  # the plugin's amazon-office.yaml (title, brand, categories, description) is passed as a file
}
DATASET_YAML = {"ml-1m": [str(PLUGIN_DATASET_YAML / "ml-1m.yaml")],
                "amazon-office": [str(PLUGIN_DATASET_YAML / "amazon-office.yaml")]}


def source_folder(dataset: str, data_root: Path) -> Path:
    """Folder holding ``<dataset>.inter/.item``: the shared data folder, or ml-1m built from its pip package."""
    from recbole_llmalign.data.atomic import verify_dataset_dir
    from recbole_llmalign.data.datasets import materialize_ml1m, shared_data_dir

    if dataset == "ml-1m":
        if not verify_dataset_dir(data_root / "ml-1m"):  # built once, then reused
            materialize_ml1m(data_root / "ml-1m", "ml-1m")
        return data_root / "ml-1m"
    if dataset == "amazon-office":  # its raw .item file breaks RecBole's reader: the quoted copy a run itself makes
        from leaderboard import source_folder as prepared_folder

        return prepared_folder(dataset, data_root)
    return shared_data_dir() / dataset


def lookup_latency(model_file: str, cache_path: Path, topk: int) -> dict[str, float]:
    """Build the top-K cache, then time 10,000 random user lookups (microseconds are reported in ms)."""
    import numpy as np

    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.serving import TopKCache, precompute_topk

    loaded = load_data_and_model(model_file)
    start = time.perf_counter()
    precompute_topk(model_file, cache_path, topk=topk, loaded=loaded)
    build_sec = time.perf_counter() - start
    start = time.perf_counter()
    cache = TopKCache(cache_path, model_file=model_file, dataset=loaded[2])
    open_sec = time.perf_counter() - start
    users = list(cache._rows)
    rng = random.Random(0)
    timings = []
    for _ in range(10_000):
        user = rng.choice(users)
        tick = time.perf_counter()
        cache.lookup(user)
        timings.append(time.perf_counter() - tick)
    timings_ms = np.array(timings) * 1000
    return {"cache_build_sec": build_sec, "cache_open_sec": open_sec, "cache_users": float(len(cache)),
            "lookup_p50_ms": float(np.percentile(timings_ms, 50)), "lookup_p99_ms": float(np.percentile(timings_ms, 99))}


def gather_per_user_files(records: list[dict], per_user_dir: Path, sources: list[str]) -> None:
    """Copy each record's per-user test metrics into one folder (the bootstrap reads them from there),
    from the folders of this run's comparisons and of a merged earlier run's."""
    import shutil

    from recbole_llmalign import report

    for record in records:
        target = report.per_user_path(per_user_dir, record["model"], record["setting"], report.record_seed(record))
        for source in sources:
            found = report.per_user_path(Path("saved") / "per_user" / source, record["model"], record["setting"],
                                         report.record_seed(record))
            if found.is_file() and found.resolve() != target.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(found, target)
                break


def summary(records: list[dict], serving: dict[str, float] | None) -> str:
    by = {(r["model"], r.get("setting", "default")): r for r in records}
    lines = []
    sasrec, gen = by.get(("SASRec", "default")), by.get(("AlignGenRec", "default"))
    if sasrec and gen:
        s, g = sasrec["result"]["test_result"], gen["result"]["test_result"]
        lines.append(f"- HR@5 AlignGenRec / SASRec: {g['hit@5']:.4f} / {s['hit@5']:.4f} = {g['hit@5'] / max(s['hit@5'], 1e-9):.2f}x (goal >= 1.00x)")
    for (model, setting), record in by.items():
        if model != "AlignGenRec":
            continue
        extra = record["cost"].get("extra", {})
        users = extra.get("eval_users", 0)
        if users and record["cost"].get("eval_sec"):
            lines.append(f"- AlignGenRec {setting}: beam search {users / record['cost']['eval_sec']:.1f} users/s in the test "
                         f"evaluation; training {extra.get('train_samples', 0) / max(record['cost']['sec_per_epoch'], 1e-9):.1f} samples/s"
                         + (f"; generated beams that are real items: {extra['beams_real']:.0f} of {extra['beams_generated']:.0f} "
                            f"({extra['beams_real_share']:.1%})" if "beams_generated" in extra else ""))
    if serving:
        lines.append(f"- cached top-10: built for {serving['cache_users']:.0f} users in {serving['cache_build_sec']:.0f} s; "
                     f"lookup p50 {serving['lookup_p50_ms'] * 1000:.1f} us, p99 {serving['lookup_p99_ms'] * 1000:.1f} us "
                     f"over 10,000 lookups (goal p99 < 1 ms)")
    return "\n".join(lines) + "\n\n"


def tokenizer_table(records: list[dict]) -> str:
    rows = [r for r in records if r["model"] == "AlignGenRec"]
    if not rows:
        return ""
    keys = [("reconstruction_mse", "recon. MSE"), ("collision_rate_before", "collisions before"),
            ("collision_rate_after", "collisions after"), ("reassigned_items", "items reassigned"),
            ("disambiguation_level", "extra level")]
    levels = max(int(r["cost"]["extra"].get("tokenizer_levels", 0)) for r in rows)
    header = ["setting"] + [label for _, label in keys] + [f"L{level} usage / perplexity" for level in range(levels)]
    lines = ["Item tokenizer (AlignGenRec runs):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in rows:
        extra = record["cost"]["extra"]
        cells = [record["setting"]] + [f"{extra.get('tokenizer_' + key, float('nan')):.4g}" for key, _ in keys]
        for level in range(levels):
            usage = extra.get(f"tokenizer_level{level}_usage")
            cells.append("-" if usage is None else f"{usage:.2f} / {extra[f'tokenizer_level{level}_perplexity']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def curve_table(records: list[dict]) -> str:
    """Valid NDCG@10 after each validation of every AlignGenRec run (seconds of training so far), to show the plateau."""
    rows = [r for r in records if r["model"] == "AlignGenRec" and len(r["cost"].get("valid_curve") or []) > 1]
    if not rows:
        return ""
    lines = ["Valid NDCG@10 per validation (AlignGenRec; s = training seconds so far; the CSV's valid_curve rows):", "",
             "| setting | validation | s | valid ndcg@10 |", "|---|---|---|---|"]
    for record in rows:
        for index, (seconds, score) in enumerate(record["cost"]["valid_curve"], start=1):
            lines.append(f"| {record['setting']} | {index} | {seconds:.0f} | {score:.4f} |")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-games", choices=sorted(DATASETS))
    parser.add_argument("--users", type=int, default=2000, help="random users kept (0 = all)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--llm-epochs", type=int, default=2, help="AlignGenRec epochs (at most, with --eval-step)")
    parser.add_argument("--eval-step", type=int, default=None,
                        help="validate AlignGenRec every N epochs (its valid curve; early stopping after --llm-stopping-step "
                        "validations without gain); default: once, after the last epoch")
    parser.add_argument("--llm-stopping-step", type=int, default=2, help="AlignGenRec's stopping_step with --eval-step")
    parser.add_argument("--budget", type=float, default=1.0, help="AlignGenRec train_sample_budget")
    parser.add_argument("--history", type=int, default=5, help="AlignGenRec prompt_history_items")
    parser.add_argument("--baseline-budget", type=float, default=600, help="train_time_budget of SASRec, s")
    parser.add_argument("--align-budget", type=float, default=300, help="train_time_budget of AlignSASRec, s")
    parser.add_argument("--ablations", default=DEFAULT_ABLATIONS, help="comma list from: " + ", ".join(ABLATIONS))
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--backbone-checkpoint", default=None,
                        help="AlignSASRec checkpoint an earlier run of this command trained (its log names it): AlignGenRec "
                        "runs on it, so a later setting is compared on exactly that backbone; use with --skip-baselines")
    parser.add_argument("--merge", default=None,
                        help="results name of an earlier run of this script on the same split and backbone (see "
                        "--backbone-checkpoint): its rows join this table, so settings are compared in one table")
    parser.add_argument("--reference", default=None,
                        help="Model or Model:setting every row is tested against (paired bootstrap over test users, 95%%)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the table from its CSV (and --merge's) without training")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from subsample import subsample_users, user_count

    from recbole_llmalign import report
    from recbole_llmalign.quick_start import compare

    data_root = Path("dataset")
    source = source_folder(args.dataset, data_root)
    name = subsample_users(source, args.dataset, args.users, 2020, data_root) if args.users else args.dataset
    config_files = DATASET_YAML.get(args.dataset, [])
    table = args.name or f"align_genrec_{args.dataset.replace('-', '')}"
    shared = {"data_path": str(data_root), **DATASETS[args.dataset], "seed": 2020, "epochs": 300, "show_progress": False,
              "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
              "metrics": ["Hit", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10", "stopping_step": 10,
              "MAX_ITEM_LIST_LENGTH": 50, "train_time_budget": args.baseline_budget}
    runs = [] if args.skip_baselines else [("SASRec", "default", {}),
                                           ("AlignSASRec", "default", {"train_time_budget": args.align_budget})]
    generative = {"llm_layers": args.llm_layers, "epochs": args.llm_epochs, "eval_step": args.eval_step or args.llm_epochs,
                  "stopping_step": args.llm_stopping_step,
                  "train_sample_budget": args.budget, "prompt_history_items": args.history, "train_time_budget": None,
                  "backbone_epochs": 300}
    per_user_dir = Path("saved") / "per_user" / table
    if args.render_only:
        records = report.records_from_csv(RESULTS / f"{table}.csv")[1]
        runs = []
        args.ablations = ""
    else:
        records = compare(runs, name, config_files, config_dict=shared, output_dir=RESULTS, name=table) if runs else []
    backbone = next((r["cost"].get("checkpoint") for r in records if r["model"] == "AlignSASRec"), None)
    backbone = backbone or args.backbone_checkpoint
    if backbone:  # AlignGenRec's frozen backbone is exactly the AlignSASRec row (or the one named)
        generative["backbone_checkpoint"] = backbone
    generative_runs = [("AlignGenRec", setting, {**generative, **ABLATIONS[setting]}) for setting in args.ablations.split(",") if setting]
    if generative_runs:
        records += compare(generative_runs, name, config_files, config_dict=shared, output_dir=RESULTS, name=table + "_partial")
        for suffix in (".md", ".csv", ".png"):
            (RESULTS / f"{table}_partial{suffix}").unlink(missing_ok=True)
    if args.merge:  # an earlier run's rows (same split and backbone) before this run's
        present = {(r["model"], r["setting"]) for r in records}
        merged = [r for r in report.records_from_csv(RESULTS / f"{args.merge}.csv")[1] if (r["model"], r["setting"]) not in present]
        records = merged + records
    gather_per_user_files(records, per_user_dir, [table, table + "_partial"] + ([args.merge, args.merge + "_partial"] if args.merge else []))
    for record in records:  # users scored in the test evaluation (one per user under leave-one-out)
        record["cost"].setdefault("extra", {})["eval_users"] = float(user_count(data_root if args.users else source.parent, name))
    serving = None
    default = next((r for r in records if r["model"] == "AlignGenRec" and r["setting"] == "default"), None)
    if default and default["cost"].get("checkpoint"):
        serving = lookup_latency(default["cost"]["checkpoint"], Path("saved") / f"topk-{name}.pth", 10)
        default["cost"]["extra"].update(serving)
    users = f"{args.users} random users of {args.dataset}" if args.users else "all users"
    setup = (f"Dataset {name} ({users}, all their interactions); leave-one-out, "
             f"full ranking; seed 2020; embedding 64, MAX_ITEM_LIST_LENGTH 50. "
             + (f"SASRec: {args.baseline_budget:.0f} s budget; AlignSASRec: all_positions, {args.align_budget:.0f} s budget; "
                if not (args.skip_baselines and args.backbone_checkpoint) else "")
             + f"AlignGenRec (on that AlignSASRec as its frozen backbone): SmolLM2-135M first {args.llm_layers} "
             f"layers, LoRA r=8 + code rows, {args.llm_epochs} epochs over a sample budget of {args.budget}"
             + (f" (validated every {args.eval_step}, early stopping after {args.llm_stopping_step} without gain)"
                if args.eval_step else "") + ", last "
             f"{args.history} items in the prompt, beam 20; {os.environ.get('OMP_NUM_THREADS', '2')} CPU threads."
             + (f" Baselines not rerun: the frozen backbone is {Path(args.backbone_checkpoint).name}, the AlignSASRec row of an "
                "earlier run of this script" + (f" ({args.merge}: its rows are merged here, and its table states their settings)"
                                                if args.merge else "")
                + "." if args.skip_baselines and args.backbone_checkpoint else "")
             + "\n\n")
    report.write_comparison(records, name, RESULTS, table, reference=args.reference, per_user_dir=per_user_dir,
                            preface=setup + summary(records, serving) + tokenizer_table(records) + curve_table(records))
    print((RESULTS / f"{table}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
