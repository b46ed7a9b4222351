"""How far apart the cross-fitting fold backbones and the full backbone are, in the vectors AlignLLMRec reads.

Why: under cross-fitting the LLM learns its projectors and residual head on soft tokens (user vector,
history item vectors) from the fold backbones, and with ``cross_fit_evaluation: full`` it is then
evaluated on the full backbone's vectors. SASRec-style backbones trained separately share no
coordinates, so those inputs can be off the distribution the LLM learned on; ``cross_fit_evaluation:
folds`` reads the same fold backbones at evaluation. This script measures the gap, per fold i, over the
test users of fold i (the users backbone i never saw), from the backbones' own checkpoints:

- ``item_cosine``: mean cosine of an item's scoring vector in fold backbone i and in the full backbone;
  ``item_cosine_aligned``: the same after the best rotation of fold i's table onto the full one
  (orthogonal Procrustes fitted on every item), i.e. how much of the gap is only a rotation;
- ``user_cosine`` / ``user_cosine_aligned``: the same for the test users' sequence vectors (the user
  soft token), under that rotation;
- ``top10_overlap``: the share of items the two backbones both put in a user's top 10 (the rankings
  can agree while the coordinates do not);
- ``ndcg@10``: each backbone on those users (``setting`` ``fold_i`` and ``full_on_fold_i``).

    python benchmarks/cross_fit_coordinates.py --backbone=saved/backbones/AlignSASRec-amazon-office-<key>.pth \\
        --folds=saved/backbones/AlignSASRec-amazon-office-fold0of5-<key>.pth,...  --name=cross_fit_coordinates_amazon-office_new0.1

Writes ``benchmarks/results/<name>.{csv,md,png}``. Evaluation only (no training); a few seconds per fold.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("item_cosine", "item_cosine_aligned", "user_cosine", "user_cosine_aligned", "top10_overlap")


def measure(backbone_file: str, fold_files: list[str]) -> tuple[str, list[list]]:
    """(dataset name, long-form rows) of the gap between each fold backbone and the full one (module docstring)."""
    import torch
    import torch.nn.functional as F

    from recbole_llmalign.data.sampling import parse_user_fold, user_folds
    from recbole_llmalign.model.abstract_recommender import load_backbone
    from recbole_llmalign.quick_start import load_data_and_model

    config, full, dataset, train_data, _, test_data = load_data_and_model(backbone_file)
    full = full.cpu()  # the fold backbones load on the CPU; so do the test batches
    name = config["dataset"]
    folds = [load_backbone(path, train_data._dataset, "cross_fit_coordinates") for path in fold_files]
    for index, (_, fold_config) in enumerate(folds):
        if parse_user_fold(fold_config["exclude_user_fold"]) != (index, len(folds)):
            raise ValueError(f"--folds entry {index} ({fold_files[index]}) leaves out fold "
                             f"{fold_config['exclude_user_fold']}, not [{index}, {len(folds)}]: list the fold backbones in order.")
    user_fold = torch.from_numpy(user_folds(train_data._dataset, len(folds)))
    rows: list[list] = []
    with torch.no_grad():
        table_full = full._scoring_table()[1:]
        batches = [batch[0] for batch in test_data]
        for index, (backbone, _) in enumerate(folds):
            backbone.eval()
            table = backbone._scoring_table()[1:]
            u, _, v = torch.linalg.svd(table.T @ table_full)  # orthogonal Procrustes: table @ rotation ~ table_full
            rotation = u @ v
            values = {"item_cosine": F.cosine_similarity(table, table_full).mean().item(),
                      "item_cosine_aligned": F.cosine_similarity(table @ rotation, table_full).mean().item()}
            users_seen = 0
            sums = {"user_cosine": 0.0, "user_cosine_aligned": 0.0, "top10_overlap": 0.0, "ndcg_fold": 0.0, "ndcg_full": 0.0}
            for interaction in batches:
                rows_of_fold = torch.nonzero(user_fold[interaction[full.USER_ID]] == index).squeeze(1)
                if not len(rows_of_fold):
                    continue
                part = interaction[rows_of_fold]
                seq, length = part[full.ITEM_SEQ], part[full.ITEM_SEQ_LEN]
                user_full, user = full.forward(seq, length), backbone.forward(seq, length)
                sums["user_cosine"] += F.cosine_similarity(user, user_full).sum().item()
                sums["user_cosine_aligned"] += F.cosine_similarity(user @ rotation, user_full).sum().item()
                scores_full, scores = full.full_sort_predict(part), backbone.full_sort_predict(part)
                scores_full[:, 0] = scores[:, 0] = float("-inf")
                top_full, top = scores_full.topk(10, dim=1).indices, scores.topk(10, dim=1).indices
                sums["top10_overlap"] += (top.unsqueeze(2) == top_full.unsqueeze(1)).any(2).float().mean(1).sum().item()
                target = part[full.POS_ITEM_ID].unsqueeze(1)
                for key, ranked in (("ndcg_fold", top), ("ndcg_full", top_full)):
                    hit = (ranked == target).float()
                    sums[key] += (hit / torch.log2(torch.arange(2, 12, dtype=torch.float))).sum().item()
                users_seen += len(rows_of_fold)
            values.update({k: sums[k] / max(users_seen, 1) for k in ("user_cosine", "user_cosine_aligned", "top10_overlap")})
            for metric in METRICS:
                rows.append([name, "AlignSASRec", f"fold_{index}", "test", metric, values[metric]])
            rows.append([name, "AlignSASRec", f"fold_{index}", "test", "ndcg@10", sums["ndcg_fold"] / max(users_seen, 1)])
            rows.append([name, "AlignSASRec", f"full_on_fold_{index}", "test", "ndcg@10", sums["ndcg_full"] / max(users_seen, 1)])
            rows.append([name, "AlignSASRec", f"fold_{index}", "test", "n_users", float(users_seen)])
    return name, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="the full backbone (cross-fitting's backbone_checkpoint)")
    parser.add_argument("--folds", required=True, help="comma list of the fold backbones, fold 0 first")
    parser.add_argument("--name", default=None, help="results name (default cross_fit_coordinates_<dataset>)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    from recbole_llmalign import report

    name, rows = measure(args.backbone, [p.strip() for p in args.folds.split(",") if p.strip()])
    out = args.name or f"cross_fit_coordinates_{name}"
    report.write_csv(rows, RESULTS / f"{out}.csv")
    value = {(r[2], r[4]): r[5] for r in rows}
    folds = sorted({r[2] for r in rows if r[2].startswith("fold_")}, key=lambda s: int(s.split("_")[1]))
    lines = ["| fold | users | " + " | ".join(METRICS) + " | ndcg@10 fold backbone | ndcg@10 full backbone |",
             "|---|---|" + "---|" * (len(METRICS) + 2)]
    for fold in folds:
        lines.append(f"| {fold.split('_')[1]} | {value[(fold, 'n_users')]:.0f} | "
                     + " | ".join(f"{value[(fold, m)]:.3f}" for m in METRICS)
                     + f" | {value[(fold, 'ndcg@10')]:.4f} | {value[('full_on_' + fold, 'ndcg@10')]:.4f} |")
    text = (f"# {out}\n\nDataset {name}; fold backbone i against the full backbone (trained on every user), on the test "
            "users of fold i (those backbone i never saw). Cosines are means over items / users; `aligned`: after the "
            "best rotation of fold i's item table onto the full one (orthogonal Procrustes on every item). top10_overlap: "
            "share of a user's top 10 both backbones rank there. NDCG@10 without history exclusion, full ranking.\n\n"
            f"Backbone: `{Path(args.backbone).name}`; folds: " + ", ".join(f"`{Path(p).name}`" for p in args.folds.split(","))
            + "\n\n" + "\n".join(lines) + "\n")
    report.write_text(RESULTS / f"{out}.md", text)
    plot(value, folds, RESULTS / f"{out}.png")
    print(text)


def plot(value: dict, folds: list[str], path: Path) -> None:
    """The five gap measures per fold."""
    import matplotlib

    from recbole_llmalign import report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    positions = np.arange(len(METRICS))
    width = 0.8 / max(len(folds), 1)
    figure, axes = plt.subplots(figsize=(8, 4))
    for offset, fold in enumerate(folds):
        axes.bar(positions + offset * width, [value[(fold, m)] for m in METRICS], width, label=fold.replace("_", " "))
    axes.set_xticks(positions + 0.4 - width / 2, [m.replace("_", "\n") for m in METRICS], fontsize=8)
    axes.set_ylabel("fold backbone vs full backbone")
    axes.set_ylim(-0.1, 1.05)
    axes.legend(fontsize=7)
    report.save_figure(figure, path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
