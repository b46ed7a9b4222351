"""Explanations of AlignLLMRec's recommendations, measured against the catalog's metadata.

For ``--users`` random users (seed 2020) of each dataset, the model ranks its top ``--topk`` items
from what it reads at test time (every interaction before the user's test item, that item itself
never shown) and every item gets one sentence per setting (model ``AlignLLMRec``, split ``test``):
- ``default``: the LLM writes from the evidence (closest history items by the backbone's item
  vectors, shared attributes, the item's own attributes) with the ``explanation_*`` keys of
  ``properties/model/AlignLLMRec.yaml`` as they are now (a checkpoint's own copies are replaced:
  they change no weights): the full-depth SmolLM2-135M-Instruct by default;
- ``template``: "Because you liked X and Y, also <attribute>." from the same evidence;
- ``title_only``: the same LLM asked about the item's title alone (its answer opening on the title),
  the reference for fluency.
Metrics (``recbole_llmalign/llm/explain_metrics.py``): ``grounded`` (goal >= 0.9),
``hallucinated`` (<= 0.05), ``tautology`` (<= 0.05), ``perplexity`` (per token, under the full
LLM), ``distinct_2``, ``sec_per_explanation`` (evidence + writing, goal <= 2 s on 2 CPU cores) and
``template_fallback`` (LLM sentences empty after cleaning, replaced by the template's).

The model is trained here with small settings unless ``--model-file`` names a checkpoint (the
ranking quality is not what is measured; the table's header says how it was trained):

    python benchmarks/explanations.py                                  # ml-100k and amazon-office, 200 users x top-5
    python benchmarks/explanations.py --datasets=ml-100k --users=10 --topk=3   # a quick look
    python benchmarks/explanations.py --datasets=amazon-office --model-file=saved/AlignLLMRec-<time>.pth

Writes ``benchmarks/results/explanations_<dataset>.{csv,md,png}`` and replaces the dataset's five
examples in README.md's "Explanations" section (between its ``explanation-examples`` markers).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DATASETS = ("ml-100k", "amazon-office")
SETTINGS = ("default", "template", "title_only")
CHECKS = ("grounded", "hallucinated", "tautology")  # per sentence; the metric is the share of sentences
METRICS = ("grounded", "hallucinated", "tautology", "perplexity", "distinct_2", "sec_per_explanation", "template_fallback")
GOALS = {"grounded": ">= 0.9", "hallucinated": "<= 0.05", "tautology": "<= 0.05", "sec_per_explanation": "<= 2"}
TITLE_ONLY_PROMPT = "In one sentence, tell a user why they may like {item}."
EXAMPLES = 5  # per dataset: ten in the README over both
LABELS = {"default": "LLM", "template": "template"}


def train_model(dataset: str, args: argparse.Namespace) -> tuple[str, str]:
    """(checkpoint, how it was trained): AlignLLMRec with small settings, its backbone trained first."""
    from recbole_llmalign.quick_start import run_with_cost

    config = {"epochs": args.llm_epochs, "train_sample_budget": args.train_samples, "backbone_epochs": args.backbone_epochs,
              "checkpoint_dir": str(Path("saved") / "explanations"), "show_progress": False, "seed": 2020,
              **({"data_path": "dataset"} if dataset != "ml-100k" else {})}
    result, cost = run_with_cost("AlignLLMRec", dataset, config_dict=config)
    ndcg = result["test_result"].get("ndcg@10")
    how = (f"AlignLLMRec trained for this benchmark (seed 2020): its AlignSASRec backbone up to {args.backbone_epochs} "
           f"epochs (early stopping), then {args.llm_epochs} epoch(s) on {args.train_samples:g} held-out samples, "
           f"other keys as in the YAML (llm_layers 8 for ranking)" + (f"; test NDCG@10 {ndcg:.4f}" if ndcg is not None else ""))
    return cost.checkpoint, how


def described(model_file: str, config: Any) -> str:
    return (f"AlignLLMRec from {Path(model_file).name} (epochs {config['epochs']}, train_sample_budget "
            f"{config['train_sample_budget']}, backbone_epochs {config['backbone_epochs']}, llm_layers {config['llm_layers']}, "
            f"seed {config['seed']})")


def explanation_keys() -> dict[str, Any]:
    """The ``explanation_*`` keys of AlignLLMRec's YAML."""
    import yaml

    values = yaml.safe_load((ROOT / "recbole_llmalign" / "properties" / "model" / "AlignLLMRec.yaml").read_text())
    return {k: v for k, v in values.items() if k.startswith("explanation_")}


def user_histories(dataset: Any) -> dict[int, list[int]]:
    """Internal user id -> internal item ids, time-ordered (stable), as the recommend command reads them."""
    import torch

    inter = dataset.inter_feat
    users, items = inter[dataset.uid_field], inter[dataset.iid_field]
    order = torch.argsort(inter[dataset.time_field], stable=True) if dataset.time_field in inter else torch.arange(len(users))
    histories: dict[int, list[int]] = {}
    for user, item in zip(users[order].tolist(), items[order].tolist()):
        histories.setdefault(user, []).append(item)
    return histories


def measure(dataset_name: str, model_file: str, how: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every setting's sentences and metrics for one dataset."""
    import torch

    from recbole_llmalign.llm.explain import LLMWriter, explainer_for
    from recbole_llmalign.llm.explain_metrics import distinct_2, grounded, hallucinated, perplexity, tautology
    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.recommend import rank_items

    config, model, dataset, *_ = load_data_and_model(model_file)
    for key, value in explanation_keys().items():  # they change no weights: measure today's, not the checkpoint's
        config[key] = value
    explainer = explainer_for(model, config, dataset)
    attributes = explainer.attributes
    histories = {u: h for u, h in user_histories(dataset).items() if len(h) >= 2}
    users = sorted(random.Random(2020).sample(sorted(histories), min(args.users, len(histories))))
    settings = list(args.settings)
    writers = {"default": explainer.writer(), "template": explainer.template,
               "title_only": LLMWriter(explainer.lm(), model.tokenizer, TITLE_ONLY_PROMPT, "{item}", explainer.max_tokens,
                                       explainer.system, explainer.no_new_names)}
    writers = {setting: writers[setting] for setting in settings}
    rows: list[dict[str, Any]] = []
    seconds = dict.fromkeys(settings, 0.0)
    uid_tokens, started = dataset.field2id_token[dataset.uid_field], time.perf_counter()
    for number, user in enumerate(users, start=1):
        history = histories[user][:-1]  # what the model reads at test time
        items, _ = rank_items(model, config, dataset, torch.tensor(history), args.topk, user)  # the user: a cross-fitted model routes by it
        texts = {}
        for setting, writer in writers.items():
            begin = time.perf_counter()
            evidence = explainer.evidence(history, items)
            texts[setting] = writer.write(evidence)
            seconds[setting] += time.perf_counter() - begin
        for k, (item, e) in enumerate(zip(items, evidence)):
            rows.append({"user": str(uid_tokens[user]), "history": history, "item": item, "rank": k + 1, "evidence": e,
                         **{setting: texts[setting][k] for setting in settings}})
        if number % 10 == 0 or number == len(users):
            print(f"{dataset_name}: {number}/{len(users)} users, {time.perf_counter() - started:.0f} s", flush=True)
    checks = {setting: [{"grounded": grounded(r[setting], r["item"], r["history"], attributes),
                         "hallucinated": hallucinated(r[setting], r["item"], r["history"], attributes),
                         "tautology": tautology(r[setting], attributes.raw_titles[r["item"]])} for r in rows]
              for setting in settings}
    dump(dataset_name, rows, checks, attributes)
    metrics: dict[str, dict[str, float]] = {}
    for setting in settings:
        sentences = [r[setting] for r in rows]
        metrics[setting] = {**{name: sum(c[name] for c in checks[setting]) / len(rows) for name in CHECKS},
                            "perplexity": perplexity(explainer.lm(), model.tokenizer, sentences),
                            "distinct_2": distinct_2(sentences), "sec_per_explanation": seconds[setting] / len(rows)}
        if hasattr(writers[setting], "fallbacks"):
            metrics[setting]["template_fallback"] = writers[setting].fallbacks / len(rows)
    return {"dataset": dataset_name, "how": how, "rows": rows, "metrics": metrics, "attributes": attributes,
            "settings": settings, "users": len(users), "topk": args.topk, "threads": torch.get_num_threads(),
            "writer": f"{'SmolLM2-135M-Instruct' if config['llm_path'] == 'default' else config['llm_path']} "
                      f"({'all layers' if explainer.full_depth else f'{model.llm_num_layers} layers'})",
            "evidence_items": explainer.evidence_items}


def dump(dataset_name: str, rows: list[dict[str, Any]], checks: dict[str, list[dict[str, bool]]], attributes: Any) -> None:
    """Every sentence with its checks, one JSON line each, under saved/ (for reading them; not committed)."""
    import json

    path = Path("saved") / "explanations" / f"explanations_{dataset_name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for n, r in enumerate(rows):
            handle.write(json.dumps({"user": r["user"], "rank": r["rank"], "item": attributes.titles[r["item"]],
                                     "evidence": r["evidence"].render(),
                                     **{s: {"text": r[s], **checks[s][n]} for s in checks}}) + "\n")
    print(f"sentences and their checks: {path}")


def write_results(run: dict[str, Any]) -> None:
    """CSV (long form), Markdown table and chart of one dataset."""
    from recbole_llmalign.report import write_csv, write_text

    name, metrics = f"explanations_{run['dataset']}", run["metrics"]
    write_csv([[run["dataset"], "AlignLLMRec", setting, "test", metric, value]
               for setting in run["settings"] for metric, value in metrics[setting].items()], RESULTS / f"{name}.csv")
    lines = [f"# Explanations on {run['dataset']}", "",
             f"{run['users']} random users (seed 2020) x top-{run['topk']} = {len(run['rows'])} explanations per setting; "
             f"history = every interaction before the user's test item. Model: {run['how']}. Writer: {run['writer']} "
             f"(greedy); evidence: the {run['evidence_items']} closest history items by the backbone's item vectors and "
             f"what they share. {run['threads']} CPU thread(s). Regenerated by `benchmarks/explanations.py`.", "",
             "| setting | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS),
             "| goal | " + " | ".join(GOALS.get(m, "") for m in METRICS) + " |"]
    for setting in run["settings"]:
        values = metrics[setting]
        lines.append(f"| {setting} | " + " | ".join(f"{values[m]:.3f}" if m in values else "" for m in METRICS) + " |")
    lines += ["", "Settings: `default` = the LLM from the evidence; `template` = \"Because you liked X and Y, also "
              "<attribute>.\"; `title_only` = the same LLM from the title alone (the fluency reference). Perplexity: "
              "per token, each sentence read alone by the full-depth LLM.", ""]
    write_text(RESULTS / f"{name}.md", "\n".join(lines))
    chart(run, RESULTS / f"{name}.png")


def chart(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recbole_llmalign.report import save_figure

    rates = ["grounded", "hallucinated", "tautology", "distinct_2"]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1, 1]})
    settings = run["settings"]
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        values = run["metrics"][setting]
        left.bar([x + i * width for x in range(len(rates))], [values[m] for m in rates], width, label=setting)
        middle.bar(i, values["perplexity"], 0.6, label=setting)
        right.bar(i, values["sec_per_explanation"], 0.6, label=setting)
    left.set_xticks([x + width * (len(settings) - 1) / 2 for x in range(len(rates))], rates)
    left.set_ylim(0, 1)
    left.legend()
    left.set_title(f"{run['dataset']}: {len(run['rows'])} explanations per setting")
    middle.set_yscale("log")
    for axis, title in ((middle, "perplexity (per token, log scale)"), (right, "s per explanation")):
        axis.set_xticks(range(len(settings)), settings, rotation=20)
        axis.set_title(title)
    save_figure(figure, path)


def examples_block(run: dict[str, Any]) -> str:
    """Markdown for the README: the top item of the first ``EXAMPLES`` users, with both sentences and the evidence."""
    attributes, lines = run["attributes"], []
    for row in [r for r in run["rows"] if r["rank"] == 1][:EXAMPLES]:
        recent = ", ".join(attributes.titles[i] for i in row["history"][-3:])
        lines += [f"- {run['dataset']}, user {row['user']} (recently: {recent}) -> **{attributes.titles[row['item']]}**",
                  *[f"  - {LABELS[s]}: {row[s]}" for s in ("default", "template") if s in row],
                  f"  - evidence: {row['evidence'].render()}"]
    return "\n".join(lines)


def update_readme(run: dict[str, Any]) -> None:
    from recbole_llmalign.io import atomic_write_text

    begin, end = f"<!-- explanation-examples:{run['dataset']}:begin -->", f"<!-- explanation-examples:{run['dataset']}:end -->"
    text = README.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        print(f"README.md has no {begin} ... {end} markers: examples not written", file=sys.stderr)
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(README, f"{head}{begin}\n{examples_block(run)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma list of: " + ", ".join(DATASETS))
    parser.add_argument("--users", type=int, default=200, help="random users per dataset (seed 2020)")
    parser.add_argument("--topk", type=int, default=5, help="explained items per user")
    parser.add_argument("--model-file", default=None,
                        help="an AlignLLMRec checkpoint to reuse (one dataset only); default: train one with the settings below")
    parser.add_argument("--backbone-epochs", type=int, default=20, help="epochs of the AlignSASRec backbone when training")
    parser.add_argument("--llm-epochs", type=int, default=1, help="epochs of AlignLLMRec when training")
    parser.add_argument("--train-samples", type=float, default=200, help="AlignLLMRec's train_sample_budget when training")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if set(datasets) - set(DATASETS):
        parser.error(f"unknown --datasets {sorted(set(datasets) - set(DATASETS))}; choose from {DATASETS}")
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if set(args.settings) - set(SETTINGS) or "default" not in args.settings:
        parser.error(f"--settings takes default and any of {SETTINGS[1:]}, got {args.settings}")
    if args.model_file and len(datasets) != 1:
        parser.error("--model-file belongs to one dataset: pass --datasets=<that dataset>")
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for dataset in datasets:
        started = time.perf_counter()
        if args.model_file:
            from recbole_llmalign.compat import load_checkpoint

            model_file = args.model_file
            how = described(model_file, load_checkpoint(model_file, map_location="cpu")["config"])
        else:
            model_file, how = train_model(dataset, args)
        run = measure(dataset, model_file, how, args)
        write_results(run)
        if not args.no_readme:
            update_readme(run)
        print((RESULTS / f"explanations_{dataset}.md").read_text())
        print(f"{dataset}: {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
