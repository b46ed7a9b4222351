"""How AlignGenRec's constrained beam search should score a code: re-evaluate trained checkpoints
under both ``beam_scoring`` settings (no retraining: only inference changes).

- ``renormalized``: at each level, a softmax over the codes the trie allows after the prefix. An
  item that is the only child of its prefix then gains log 1 = 0 at that level, whatever the model
  thinks of it, so items in sparse corners of the code tree are inflated.
- ``model``: the level softmax training optimises (over all K codes), invalid codes only masked.
  Every level keeps its say, and an item's score is the model's probability of its codes.

Checkpoints come from ``align_genrec.py`` (its AlignGenRec rows); the SASRec and AlignSASRec test
figures of that run are read from its CSV (``--reference``) for the HR@5 ratio.

    python benchmarks/align_genrec_beam_scoring.py --reference=benchmarks/results/align_genrec_amazongames.csv \\
        --checkpoint default=saved/AlignGenRec-A.pth --checkpoint no_llm_align=saved/AlignGenRec-B.pth
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCORINGS = ("renormalized", "model")


def evaluate_both(setting: str, model_file: str, progress) -> tuple[str, list[list]]:
    """Long-form rows of one checkpoint under every scoring (valid and test splits)."""
    from recbole_llmalign.quick_start import load_data_and_model
    from recbole_llmalign.trainer import AlignGenRecTrainer

    config, model, _, _, valid, test = load_data_and_model(model_file)
    rows = []
    for scoring in SCORINGS:
        model.beam_scoring = scoring
        trainer = AlignGenRecTrainer(config, model)
        for split, data in (("valid", valid), ("test", test)):
            start = time.perf_counter()
            result = trainer.evaluate(data, load_best_model=False, show_progress=False)
            seconds = time.perf_counter() - start
            rows += [[config["dataset"], "AlignGenRec", f"{setting}/{scoring}", split, m, float(v)] for m, v in result.items()]
            rows.append([config["dataset"], "AlignGenRec", f"{setting}/{scoring}", split, "eval_sec", seconds])
            rows.append([config["dataset"], "AlignGenRec", f"{setting}/{scoring}", split, "beam_size", float(model.beam_size)])
            progress.update(1)
    return config["dataset"], rows


def table(rows: list[list], reference: list[dict[str, str]]) -> str:
    """Markdown: one line per (setting, scoring), reference models first."""
    metrics = ["hit@5", "ndcg@5", "hit@10", "ndcg@10"]
    lines = ["| model | setting | " + " | ".join(f"test {m}" for m in metrics) + " | valid ndcg@10 | test eval s |",
             "|---|---|" + "---|" * (len(metrics) + 2)]
    for model in ("SASRec", "AlignSASRec"):
        ref = {r["metric"]: float(r["value"]) for r in reference
               if r["model"] == model and r["setting"] == "default" and r["split"] == "test"}
        ref_valid = {r["metric"]: float(r["value"]) for r in reference
                     if r["model"] == model and r["setting"] == "default" and r["split"] == "valid"}
        if ref:
            lines.append(f"| {model} | default (reference run) | " + " | ".join(f"{ref.get(m, float('nan')):.4f}" for m in metrics)
                         + f" | {ref_valid.get('ndcg@10', float('nan')):.4f} | - |")
    settings = list(dict.fromkeys(r[2] for r in rows))
    for setting in settings:
        test = {r[4]: r[5] for r in rows if r[2] == setting and r[3] == "test"}
        valid = {r[4]: r[5] for r in rows if r[2] == setting and r[3] == "valid"}
        lines.append(f"| AlignGenRec | {setting} | " + " | ".join(f"{test[m]:.4f}" for m in metrics)
                     + f" | {valid['ndcg@10']:.4f} | {test['eval_sec']:.1f} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[list], sasrec_hit5: float | None, path: Path, title: str) -> None:
    """Test HR@5 per checkpoint, one bar per scoring, SASRec's HR@5 as a line."""
    import matplotlib

    from recbole_llmalign import report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    settings = list(dict.fromkeys(r[2].split("/")[0] for r in rows))
    figure, axis = plt.subplots(figsize=(7, 4))
    positions = np.arange(len(settings))
    for index, scoring in enumerate(SCORINGS):
        values = [next(r[5] for r in rows if r[2] == f"{s}/{scoring}" and r[3] == "test" and r[4] == "hit@5") for s in settings]
        axis.bar(positions + index * 0.4, values, 0.4, label=f"beam_scoring={scoring}")
    if sasrec_hit5 is not None:
        axis.axhline(sasrec_hit5, color="black", linestyle="--", label="SASRec (same split)")
    axis.set_xticks(positions + 0.2, settings)
    axis.set_ylabel("test HR@5")
    axis.set_title(title)
    axis.legend(fontsize=8)
    report.save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="setting=path of an AlignGenRec checkpoint")
    parser.add_argument("--reference", required=True, help="align_genrec.py CSV of the run that trained the checkpoints")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it
    pairs = []
    for item in args.checkpoint:
        setting, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--checkpoint must be setting=path of an existing file; got {item!r}.")
        pairs.append((setting, path))

    from tqdm import tqdm

    from recbole_llmalign import report

    reference = report.read_csv(Path(args.reference))
    rows, dataset = [], ""
    with tqdm(total=len(pairs) * len(SCORINGS) * 2, desc="evaluations", unit="eval") as progress:
        for setting, path in pairs:
            dataset, new_rows = evaluate_both(setting, path, progress)
            rows += new_rows
    name = args.name or f"align_genrec_beam_scoring_{dataset.split('-u')[0].replace('-', '')}"
    report.write_csv(rows, RESULTS / f"{name}.csv")
    sasrec = next((float(r["value"]) for r in reference if r["model"] == "SASRec" and r["split"] == "test"
                   and r["metric"] == "hit@5"), None)
    beam = next(r[5] for r in rows if r[4] == "beam_size")
    lines = [f"# {name}\n", f"Dataset {dataset}; checkpoints of the run in `{Path(args.reference).name}` re-evaluated "
             f"(no retraining) under each `beam_scoring`; beam {beam:.0f}, full ranking; "
             f"{os.environ.get('OMP_NUM_THREADS', '2')} CPU threads.\n"]
    if sasrec:
        for setting, _ in pairs:
            ratios = ", ".join(
                f"{scoring} {next(r[5] for r in rows if r[2] == f'{setting}/{scoring}' and r[3] == 'test' and r[4] == 'hit@5') / sasrec:.2f}x"
                for scoring in SCORINGS)
            lines.append(f"- HR@5 AlignGenRec {setting} / SASRec: {ratios} (goal >= 1.00x)")
        lines.append("")
    text = "\n".join(lines) + "\n" + table(rows, reference)
    report.write_text(RESULTS / f"{name}.md", text)
    chart(rows, sasrec, RESULTS / f"{name}.png", f"{dataset}: test HR@5 by beam scoring")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
