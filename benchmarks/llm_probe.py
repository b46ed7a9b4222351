"""Does the frozen LLM's reading of a user's history hold ranking signal its backbone and the word embeddings lack?

Why: every AlignLLMRec lever measured so far (holdout, refit, cross-fitting, LLM item vectors,
re-ranking, learning rates) leaves the LLM reader level with its no_llm MLP twin, and both close to
the backbone. Those runs train prefixes and a zero-started residual head through the LLM for 3
epochs at 1e-4: neither reader may have converged, so "the LLM adds nothing" and "the LLM was not
trained long enough to add anything" cannot be told apart. This probe takes the training out of the
question: the LLM stays frozen, its states are computed once per prompt, and only the residual head
is trained, to early stopping on valid, for every feature set alike:

- ``backbone``: the holdout AlignSASRec alone (no head; should equal the LLM rows' own backbone);
- ``token_mean``: the mean of the prompt's input token embeddings (the same tokens the LLM reads,
  without any LLM layer: the no-LLM twin);
- ``llm_last_L<l>`` / ``llm_mean_L<l>``: the LLM's hidden state after layer ``l`` at the prompt's last
  token / averaged over its tokens.

Head (the model's ``rank_with_backbone_residual`` head, trained here alone): query = backbone user
vector + W f + b, W and b zero at the start, scores = query . backbone scoring table, cross-entropy
over every item (unseen items masked as the model masks them), on the model's own stacking samples
(each user's last training target, which the holdout backbone never fit: the candidates the model's trainer draws
from, all of them, where the model draws ``train_sample_budget`` of the training rows among them, 3,451 of 4,871 on
amazon-office; the trainer's ``denoise_samples`` filter is not applied, and on amazon-office it keeps every row). The grid
(learning rate x weight decay) is the same for every feature set and is chosen on valid NDCG@10;
test is read once. Prompts: the model's ``titles`` prompt (instruction text + template + the last
``prompt_history_items`` titles) without the user soft token (a frozen probe has no trained projector).

    python benchmarks/llm_probe.py --dataset=amazon-office --new-item-ratio=0.1 --seed=2020 --layers=8,16,30
    # every training target an honest sample: 5 fold backbones (~4 min each on amazon-office, cached), 34,514 prompts
    # (14 min of 8-layer passes), then the head grid (~4 min per feature set); about 50 min in all
    python benchmarks/llm_probe.py --dataset=amazon-office --new-item-ratio=0.1 --seed=2020 --layers=8 --cross-fit=5

Writes ``benchmarks/results/llm_probe_<dataset>[_new<ratio>][_cross_fit<K>][_mlp_head][_seed<N>].{csv,md,png}`` (``_seed<N>`` for
seeds other than the default 2020; rows: setting = feature set,
split valid/test/test_cold/test_new, metrics ndcg@10, recall@10, hit@5, and the paired-bootstrap
``ndcg@10_diff_lo``/``_hi`` of each feature set against ``token_mean`` and against ``backbone``).
The LLM states are cached under ``saved/llm_probe/`` (one LLM pass per prompt: amazon-office's 14,681 prompts took
1,513 s at 30 layers on 2 CPU cores, 0.10 s each); the backbone is the leaderboard's cached holdout AlignSASRec
(trained when missing, ~5 min there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ndcg@10", "recall@10", "hit@5")
GRID = [(lr, wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for wd in (0.0, 1e-4)]  # (learning rate, weight decay), chosen on valid


def build(dataset: str, ratio: float, seed: int, layers: list[int], cross_fit: int = 0) -> tuple[Any, Any, Any, Any, Any]:
    """(config, model, train_data, valid_data, test_data): AlignLLMRec as the leaderboard builds it, with the
    LLM cut to ``max(layers)`` layers, titles prompts and every stacking sample; with ``cross_fit`` K, its
    ``cross_fit_folds: K`` and ``cross_fit_evaluation: folds`` (the leaderboard's ``cross_fit_5_folds`` row)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from leaderboard import source_folder
    from recbole.data import create_dataset
    from recbole.utils import init_seed

    from recbole_llmalign.config import Config
    from recbole_llmalign.data import data_preparation, prepare_dataset  # the plugin's: new-item protocol, stacking
    from recbole_llmalign.model.align_llmrec import AlignLLMRec
    from recbole_llmalign.quick_start import ensure_backbone

    data_root = Path("dataset")
    source_folder(dataset, data_root)
    # the leaderboard's shared keys exactly, so the backbone's cache key is the leaderboard LLM rows' one
    data_config = {} if dataset == "ml-100k" else {"data_path": str(data_root)}  # ml-100k: RecBole's own copy, as there
    config_dict = {**data_config, "epochs": 3, "eval_step": 3, "backbone_epochs": 300, "stopping_step": 10,
                   "show_progress": False, "valid_metric": "NDCG@10", "metrics": ["Recall", "NDCG", "Hit"], "topk": [5, 10],
                   "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
                   "cold_item_threshold": 5, "train_time_budget": None, "new_item_ratio": ratio or None, "seed": seed,
                   "prompt_mode": "titles", "train_sample_budget": 1.0, "llm_layers": max(layers)}
    if cross_fit:  # K fold backbones, each without one fold of users; valid/test routed to them as training is
        config_dict.update({"cross_fit_folds": cross_fit, "cross_fit_evaluation": "folds"})
    config = Config(model="AlignLLMRec", dataset=dataset, config_dict=config_dict)
    prepare_dataset(config)
    ensure_backbone(config, None)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    model = AlignLLMRec(config, train_data._dataset).eval()
    return config, model, train_data, valid_data, test_data


def rows_of(loader: Any, model: Any) -> dict[str, np.ndarray]:
    """Every row of an evaluation loader: users, padded histories, lengths, targets."""
    parts: dict[str, list[np.ndarray]] = {"user": [], "seq": [], "len": [], "target": []}
    for batch in loader:
        interaction = batch[0]
        for key, field in (("user", model.USER_ID), ("seq", model.ITEM_SEQ), ("len", model.ITEM_SEQ_LEN),
                           ("target", model.POS_ITEM_ID)):
            parts[key].append(interaction[field].numpy())
    return {key: np.concatenate(value) for key, value in parts.items()}


def stacking_rows(config: Any, model: Any, dataset: Any) -> dict[str, np.ndarray]:
    """The candidates the model's trainer draws its samples from, all of them (``train_sample_budget`` 1, no denoising
    filter): each user's last ``holdout_last_targets`` training targets, the ones the holdout backbone never fit. The other
    training rows are targets the backbone was trained on, where a head would learn to undo its fit, not to add. Under
    cross-fitting every training target is honest (read by the fold backbone that never saw its user): all of them."""
    from recbole_llmalign.data.sampling import sample_budget_rows, select_training_rows
    from recbole_llmalign.trainer import cross_fit_folds, stacking_holdout

    holdout = stacking_holdout(config)
    if holdout < 1 and not cross_fit_folds(config):
        raise ValueError(f"the probe needs honest samples: stacking (holdout_last_targets >= 1, got {holdout}) or "
                         "cross-fitting (--cross-fit K)")
    inter = dataset.inter_feat
    targets = inter[model.POS_ITEM_ID].numpy()
    index, notes = select_training_rows(
        inter[model.ITEM_SEQ].numpy(), inter[model.ITEM_SEQ_LEN].numpy(), targets, inter[model.USER_ID].numpy(),
        budget_rows=sample_budget_rows(1.0, len(targets)), buckets=int(config["diversity_buckets"]),
        seed=int(config["seed"]), holdout=holdout)
    print("; ".join(notes) + f" {len(index)} of {len(targets)} training rows probed.", flush=True)
    index = np.sort(index)
    return {key: inter[field].numpy()[index] for key, field in
            (("user", model.USER_ID), ("seq", model.ITEM_SEQ), ("len", model.ITEM_SEQ_LEN), ("target", model.POS_ITEM_ID))}


def features(model: Any, rows: dict[str, np.ndarray], layers: list[int], micro_batch: int = 32) -> dict[str, np.ndarray]:
    """Per row: the text features of its titles prompt (module docstring). They depend on the LLM and the prompt only,
    not on the backbone, so one cache serves the holdout and the cross-fitted probes."""
    import torch
    from tqdm import tqdm

    seq, length = torch.from_numpy(rows["seq"]), torch.from_numpy(rows["len"])
    prompts = model.prompts.assemble(seq, length, None, None)
    instruction = model.instruction_ids[0].tolist()
    token_lists = [instruction + [t for t, m in zip(ids.tolist(), mask.tolist()) if m and t >= 0]  # no user soft token
                   for ids, mask in zip(prompts.token_ids, prompts.attention_mask)]
    order = np.argsort([len(t) for t in token_lists], kind="stable")  # similar lengths per pass: little padding
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for start in tqdm(range(0, len(order), micro_batch), desc="LLM states", unit="batch", mininterval=30):
            rows_here = order[start:start + micro_batch]
            width = max(len(token_lists[i]) for i in rows_here)
            ids = torch.full((len(rows_here), width), model.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows_here), width), dtype=torch.long)
            for r, i in enumerate(rows_here):  # left padding: the last position is real
                ids[r, width - len(token_lists[i]):] = torch.tensor(token_lists[i])
                mask[r, width - len(token_lists[i]):] = 1
            weights = mask.unsqueeze(-1).float() / mask.sum(1, keepdim=True).unsqueeze(-1).float()
            embeds = model.embed_tokens(ids)
            named = {"token_mean": (embeds.float() * weights).sum(1)}
            output = model.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=model.positions(mask),
                                   output_hidden_states=True)
            for layer in layers:
                state = output.hidden_states[layer].float()
                named[f"llm_last_L{layer}"] = state[:, -1]
                named[f"llm_mean_L{layer}"] = (state * weights).sum(1)
            for name, value in named.items():
                collected.setdefault(name, []).append((rows_here, value.numpy()))
        for name, pieces in collected.items():
            table = np.zeros((len(order), pieces[0][1].shape[1]), dtype=np.float32)
            for rows_here, value in pieces:
                table[rows_here] = value
            out[name] = table
    return out


def cached_features(model: Any, rows: dict[str, np.ndarray], layers: list[int], path: Path) -> dict[str, np.ndarray]:
    """``features``, read from ``path`` when it holds exactly these rows (users, histories, targets) and layers."""
    if path.is_file():
        with np.load(path) as stored:
            same = all(k in stored and np.array_equal(stored[k], rows[k]) for k in rows)
            if same and all(f"llm_last_L{layer}" in stored for layer in layers):  # older caches also hold user_vector
                return {k: stored[k] for k in stored.files if k not in rows and k != "user_vector"}
        print(f"{path} holds other rows or layers: computing the features again")
    computed = features(model, rows, layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.npz")
    np.savez(temp, **rows, **computed)
    os.replace(temp, path)  # atomic: a killed run leaves no half-written cache
    return computed


def backbone_reads(model: Any, rows: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[Any]]:
    """({user_vector, fold} per row, the scoring table of each fold): the backbone's side of the head's scores. Without
    cross-fitting one fold, the model's backbone (the holdout one); with it, each row read by the fold backbone that
    never saw its user (``user_fold``), the way the model's cross-fitted training and ``folds`` evaluation read them."""
    import torch

    seq, length = torch.from_numpy(rows["seq"]), torch.from_numpy(rows["len"])
    if model.fold_backbones is None:
        with torch.no_grad():
            vectors = torch.cat([model.user_vectors(seq[i:i + 1024], length[i:i + 1024]) for i in range(0, len(seq), 1024)])
        return {"user_vector": vectors.numpy(), "fold": np.zeros(len(seq), dtype=np.int64)}, [model.item_side().scoring.detach()]
    folds = model.user_fold[torch.from_numpy(rows["user"])].numpy()
    vectors = np.zeros((len(seq), model.cf_dim), dtype=np.float32)
    tables = []
    try:
        for fold in range(len(model.fold_backbones)):
            model.active_fold = fold
            here = np.flatnonzero(folds == fold)
            with torch.no_grad():
                for start in range(0, len(here), 1024):
                    part = torch.from_numpy(here[start:start + 1024])
                    vectors[part.numpy()] = model.user_vectors(seq[part], length[part]).numpy()
            tables.append(model.item_side().scoring.detach())
    finally:
        model.active_fold = None
    return {"user_vector": vectors, "fold": folds.astype(np.int64)}, tables


def per_user_metrics(scores: Any, targets: Any) -> dict[str, np.ndarray]:
    """NDCG@10, Recall@10 and Hit@5 of each row, full ranking (item 0 excluded), RecBole's protocol (no history mask)."""
    import torch

    scores = scores.clone()
    scores[:, 0] = float("-inf")
    rank = (scores > scores.gather(1, targets.unsqueeze(1))).sum(1)
    ndcg = torch.where(rank < 10, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros_like(rank, dtype=torch.float))
    return {"ndcg@10": ndcg.numpy(), "recall@10": (rank < 10).float().numpy(), "hit@5": (rank < 5).float().numpy()}


def residual_head(features: int, out: int, kind: str, hidden: int = 256) -> Any:
    """The residual head, zero at the start so training starts from the backbone: ``linear`` (W f + b, the model's
    head) or ``mlp`` (one GELU hidden layer of ``hidden`` units, its output layer zero), for signal a linear map misses."""
    import torch

    if kind == "linear":
        head = torch.nn.Linear(features, out)
        last = head
    elif kind == "mlp":
        last = torch.nn.Linear(hidden, out)
        head = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.GELU(), last)
    else:
        raise ValueError(f"--head must be linear or mlp, got {kind!r}")
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return head


def train_head(tables: list[Any], unseen: Any, data: dict[str, dict[str, np.ndarray]], feature: str | None, lr: float,
               weight_decay: float, seed: int, kind: str = "linear", max_epochs: int = 300, patience: int = 20,
               batch: int = 256) -> tuple[float, dict[str, dict]]:
    """(best valid NDCG@10, per-user metrics of valid and test at that epoch) of the residual head on ``feature``.

    ``tables``: the scoring table of each fold (one without cross-fitting); a row's query is scored against its
    ``fold``'s table. ``unseen``: items masked out of the training cross-entropy (None: none)."""
    import torch
    import torch.nn.functional as F

    as_tensor = {split: {k: torch.from_numpy(v) for k, v in part.items()} for split, part in data.items()}
    if feature is not None:
        mean = as_tensor["train"][feature].mean(0)
        std = as_tensor["train"][feature].std(0).clamp(min=1e-6)
        for part in as_tensor.values():
            part["x"] = (part[feature] - mean) / std
    torch.manual_seed(seed)
    head = residual_head(as_tensor["train"]["x"].size(1), tables[0].size(1), kind) if feature else None

    def scores_of(part: dict[str, Any], rows: Any = slice(None)) -> Any:
        query = part["user_vector"][rows]
        if head is not None:
            query = query + head(part["x"][rows])
        if len(tables) == 1:
            return query @ tables[0].T
        folds = part["fold"][rows]
        scores = query.new_zeros(len(query), tables[0].size(0))
        for fold, table in enumerate(tables):  # each row against its fold backbone's items
            here = torch.nonzero(folds == fold).squeeze(1)
            scores = scores.index_copy(0, here, query[here] @ table.T)
        return scores

    def evaluate() -> dict[str, dict[str, np.ndarray]]:
        with torch.no_grad():
            return {split: per_user_metrics(scores_of(as_tensor[split]), as_tensor[split]["target"])
                    for split in ("valid", "test")}

    best = evaluate()
    best_valid = float(best["valid"]["ndcg@10"].mean())
    if head is None:
        return best_valid, best
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train = as_tensor["train"]
    waited = 0
    for _ in range(max_epochs):
        for rows in torch.randperm(len(train["target"]), generator=generator).split(batch):
            scores = scores_of(train, rows)
            if unseen is not None:
                scores = scores.masked_fill(unseen, float("-inf"))
            loss = F.cross_entropy(scores, train["target"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        current = evaluate()
        valid = float(current["valid"]["ndcg@10"].mean())
        if valid > best_valid:
            best, best_valid, waited = current, valid, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best_valid, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="amazon-office")
    parser.add_argument("--new-item-ratio", type=float, default=0.0, help="new_item_ratio (0 = protocol off)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--layers", default="8,16,30", help="LLM layers whose states are probed (comma list)")
    parser.add_argument("--head", default="linear", choices=("linear", "mlp"),
                        help="residual head: linear (the model's, W f + b) or mlp (one hidden layer; results under _mlp_head)")
    parser.add_argument("--max-rows", type=int, default=0,
                        help="smoke test: only the first N rows of each split, results under a _smoke name (0 = all)")
    parser.add_argument("--cross-fit", type=int, default=0, metavar="K",
                        help="train the head on every training target, each read by the cross-fitting fold backbone "
                             "(K folds) that never saw its user, valid/test routed the same way (results under _cross_fit<K>)")
    args = parser.parse_args()
    layers = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it

    import torch

    from recbole_llmalign import report
    from recbole_llmalign.data import training_pairs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    started = time.perf_counter()
    config, model, train_data, valid_data, test_data = build(args.dataset, args.new_item_ratio, args.seed, layers, args.cross_fit)
    name = f"llm_probe_{args.dataset}" + (f"_new{args.new_item_ratio:g}" if args.new_item_ratio else "")
    features_name = name + ("_smoke" if args.max_rows else "")  # the LLM-state cache: the same for every head
    name += (f"_cross_fit{args.cross_fit}" if args.cross_fit else "") + ("_mlp_head" if args.head == "mlp" else "") + (f"_seed{args.seed}" if args.seed != 2020 else "")
    name += "_smoke" if args.max_rows else ""  # seed 2020 (the default) keeps the plain name
    cache = Path("saved") / "llm_probe"
    data: dict[str, dict[str, np.ndarray]] = {}
    for split, loader in (("train", train_data), ("valid", valid_data), ("test", test_data)):
        rows = stacking_rows(config, model, loader._dataset) if split == "train" else rows_of(loader, model)
        if args.max_rows:
            rows = {key: value[:args.max_rows] for key, value in rows.items()}
        rows_name = "train_all_targets" if split == "train" and args.cross_fit else split  # other rows: their own cache
        text = cached_features(model, rows, layers, cache / f"{features_name}_s{args.seed}_{rows_name}.npz")
        reads, tables = backbone_reads(model, rows)
        data[split] = {**rows, **text, **reads}
    feature_seconds = time.perf_counter() - started
    unseen = model.unseen_item_mask if getattr(model.fit_backbone, "unseen_items", "negatives") == "text" else None

    counts = np.bincount(np.fromiter((i for _, i in training_pairs(train_data._dataset)), dtype=np.int64),
                         minlength=train_data._dataset.item_num)
    test_targets = data["test"]["target"]
    flags = {"test": np.ones(len(test_targets), dtype=bool), "test_cold": counts[test_targets] <= 5}
    new_items = getattr(test_data._dataset, "new_item_ids", None)
    if new_items is not None:  # new-item protocol: users whose test item is new
        flags["test_new"] = np.isin(test_targets, np.asarray(new_items))

    feature_sets: list[str | None] = [None, "token_mean"] + [f"llm_{kind}_L{layer}" for layer in layers for kind in ("last", "mean")]
    label = {None: "backbone"}
    rows_out: list[list[Any]] = []
    per_user: dict[str, np.ndarray] = {}
    chosen: dict[str, str] = {}
    for feature in feature_sets:
        setting = label.get(feature, feature)
        grid = [(0.0, 0.0)] if feature is None else GRID
        results = [(train_head(tables, unseen, data, feature, lr, wd, args.seed, args.head), lr, wd) for lr, wd in grid]
        (valid_score, metrics), lr, wd = max(results, key=lambda r: r[0][0])
        chosen[setting] = "-" if feature is None else f"lr {lr:g}, weight decay {wd:g}"
        per_user[setting] = metrics["test"]["ndcg@10"]
        for metric in METRICS:
            rows_out.append([config["dataset"], "AlignLLMRec", f"probe_{setting}", "valid", metric,
                             float(metrics["valid"][metric].mean())])
            for split, where in flags.items():
                rows_out.append([config["dataset"], "AlignLLMRec", f"probe_{setting}", split, metric,
                                 float(metrics["test"][metric][where].mean())])
        print(f"{setting}: valid {valid_score:.4f}, test {per_user[setting].mean():.4f} ({chosen[setting]})", flush=True)
    users = data["test"]["user"]
    for reference in ("token_mean", "backbone"):
        for setting, values in per_user.items():
            if setting == reference:
                continue
            for split, where in flags.items():
                _, low, high, _ = report.paired_bootstrap(users[where], values[where] - per_user[reference][where])
                for bound, value in (("lo", low), ("hi", high)):
                    suffix = "" if reference == "token_mean" else "_vs_backbone"
                    rows_out.append([config["dataset"], "AlignLLMRec", f"probe_{setting}", split,
                                     f"ndcg@10_diff{suffix}_{bound}", value])
    report.write_csv(rows_out, RESULTS / f"{name}.csv")
    text = table_text(name, rows_out, flags, chosen, {k: len(v["target"]) for k, v in data.items()}, layers,
                      feature_seconds, config, args.head, args.cross_fit)
    report.write_text(RESULTS / f"{name}.md", text)
    plot(rows_out, RESULTS / f"{name}.png", name)
    print(text)


def table_text(name: str, rows: list[list[Any]], flags: dict[str, np.ndarray], chosen: dict[str, str],
               sizes: dict[str, int], layers: list[int], seconds: float, config: Any, head: str = "linear",
               cross_fit: int = 0) -> str:
    """The readable table: per feature set, valid and test slices, and the bootstrap intervals."""
    value = {(r[2], r[3], r[4]): r[5] for r in rows}
    settings = list(dict.fromkeys(r[2] for r in rows))
    splits = list(flags)
    header = ("| feature set | valid ndcg@10 | " + " | ".join(f"{s} ndcg@10" for s in splits)
              + " | test recall@10 | test - token_mean [95%] | test - backbone [95%] | head grid choice |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def interval(setting: str, suffix: str) -> str:
        low, high = value.get((setting, "test", f"ndcg@10_diff{suffix}_lo")), value.get((setting, "test", f"ndcg@10_diff{suffix}_hi"))
        if low is None:
            return "-"
        verdict = "significant" if low > 0 or high < 0 else "within noise"
        return f"[{low:+.4f}, {high:+.4f}] {verdict}"

    for setting in settings:
        lines.append(f"| {setting.removeprefix('probe_')} | {value[(setting, 'valid', 'ndcg@10')]:.4f} | "
                     + " | ".join(f"{value[(setting, s, 'ndcg@10')]:.4f}" for s in splits)
                     + f" | {value[(setting, 'test', 'recall@10')]:.4f} | {interval(setting, '')} | "
                     f"{interval(setting, '_vs_backbone')} | {chosen[setting.removeprefix('probe_')]} |")
    counts = ", ".join(f"{s} {int(flags[s].sum())}" for s in splits)
    if cross_fit:
        reader = "fold backbone"
        samples = (f"all {sizes['train']} training targets, each user's read by the one of {cross_fit} cross-fitting fold "
                   "backbones that never saw them (each trained on the other folds' users); valid and test users are read and "
                   "ranked the same way (cross_fit_evaluation: folds), so `backbone` is those routed fold backbones")
    else:
        reader = "holdout backbone"
        samples = f"the {sizes['train']} stacking samples"
    return (f"# {name}\n\nDataset {config['dataset']}, seed {config['seed']}"
            + (f", new-item protocol {config['new_item_ratio']:g}" if config["new_item_ratio"] else "")
            + f". Frozen {config['llm_path']} LLM cut to {max(layers)} layers, states after layers {', '.join(map(str, layers))};"
            f" titles prompt ({config['prompt_history_items']} items, instruction text, no soft tokens). Residual head"
            + (f" (query = {reader} user vector + W f + b, zero start)" if head == "linear" else
               f" (query = {reader} user vector + MLP(f): one GELU layer of 256 units, output layer zero at the start)")
            + f" trained alone to early stopping on valid NDCG@10 (patience 20) on {samples}; grid lr x weight decay chosen on valid per"
            f" feature set; {sizes['valid']} valid and {sizes['test']} test users ({counts}). Paired bootstrap over test"
            f" users, 95%. Features: {seconds:.0f} s (LLM passes, cached).\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[list[Any]], path: Path, title: str) -> None:
    """Test NDCG@10 per feature set and slice."""
    import matplotlib

    from recbole_llmalign import report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = {(r[2], r[3]): r[5] for r in rows if r[4] == "ndcg@10"}
    settings = list(dict.fromkeys(r[2] for r in rows))
    splits = [s for s in ("test", "test_cold", "test_new") if (settings[0], s) in value]
    width = 0.8 / len(splits)
    figure, axes = plt.subplots(figsize=(9, 4))
    positions = np.arange(len(settings))
    for offset, split in enumerate(splits):
        axes.bar(positions + offset * width, [value[(s, split)] for s in settings], width, label=split)
    axes.set_xticks(positions + 0.4 - width / 2, [s.removeprefix("probe_").replace("_", "\n") for s in settings], fontsize=7)
    axes.set_ylabel("NDCG@10")
    axes.set_title(title)
    axes.legend(fontsize=7)
    report.save_figure(figure, path)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
