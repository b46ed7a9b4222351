"""What AlignLLMRec costs on this CPU: training samples/s, evaluation users/s, peak memory, and how
close the LLM forward comes to the machine's plain matmul throughput.

For each ``llm_layers`` setting a fresh process builds AlignLLMRec on the dataset (the cached
AlignSASRec backbone is reused, or trained once), then times
- training: optimizer steps on batches of ``train_batch_size`` samples (forward, backward, step);
- evaluation: ``full_sort_predict`` (one LLM pass per user, ranking every item) on test users;
- the LLM forward alone, with its FLOPs counted by ``torch.utils.flop_counter`` and divided by its
  time, against a plain ``torch.matmul`` of the same token count x hidden x MLP width timed in the
  same process (the achievable GFLOP/s of this CPU for that shape).
The frozen backbone's own ``full_sort_predict`` is timed too, for the users/s ratio.

    python benchmarks/align_llmrec_cost.py --dataset=ml-100k --layers=8,30
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("train_samples_per_sec", "eval_users_per_sec", "backbone_users_per_sec", "peak_mem_mb",
           "llm_gflop_per_forward", "llm_gflop_per_sec", "matmul_gflop_per_sec", "llm_fraction_of_matmul")


def _timed(function: Any, repeats: int) -> float:
    """Median seconds of ``function()`` over ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(dataset: str, llm_layers: int | None, train_steps: int, eval_users: int) -> dict[str, float]:
    """All metrics for one setting; runs in its own process so peak memory is its own."""
    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_logger, init_seed
    from torch.utils.flop_counter import FlopCounterMode

    from recbole_llmalign.config import Config
    from recbole_llmalign.data import prepare_dataset
    from recbole_llmalign.quick_start import ensure_backbone, peak_memory_mb
    from recbole_llmalign.utils import get_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = Config(model="AlignLLMRec", dataset=dataset, config_dict={"llm_layers": llm_layers, "show_progress": False})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    prepare_dataset(config)
    ensure_backbone(config)
    train_data, _, test_data = data_preparation(config, create_dataset(config))
    model = get_model("AlignLLMRec")(config, train_data._dataset)

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = iter(train_data)

    def train_step() -> None:
        losses = model.calculate_loss(next(batches))
        loss = sum(losses) if isinstance(losses, tuple) else losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    batch_size = int(config["train_batch_size"])
    train_sec = _timed(train_step, train_steps)

    model.eval()
    users = next(iter(test_data))[0]
    part = {key: users[key][:eval_users] for key in (model.ITEM_SEQ, model.ITEM_SEQ_LEN)}
    n_users = part[model.ITEM_SEQ].size(0)
    eval_sec = _timed(lambda: model.full_sort_predict(part), 2)
    backbone_sec = _timed(lambda: model.scoring_backbone.full_sort_predict(part), 3)

    micro = {key: value[:model.micro_batch] for key, value in part.items()}
    model.requires_grad_(False)  # training is measured; the flop counter's module hooks trip over grad-less parameters
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # and over inference tensors
        model.llm_states(micro[model.ITEM_SEQ], micro[model.ITEM_SEQ_LEN])
    llm_flops = counter.get_total_flops()
    with torch.inference_mode():
        llm_sec = _timed(lambda: model.llm_states(micro[model.ITEM_SEQ], micro[model.ITEM_SEQ_LEN]), 3)
        tokens = micro[model.ITEM_SEQ].size(0) * model.prompts.assemble(micro[model.ITEM_SEQ], micro[model.ITEM_SEQ_LEN]).token_ids.size(1)
        text_config = model.decoder.config
        left = torch.randn(tokens, text_config.hidden_size)
        right = torch.randn(text_config.hidden_size, text_config.intermediate_size)
        matmul_sec = _timed(lambda: left @ right, 20)
    matmul_rate = 2 * tokens * text_config.hidden_size * text_config.intermediate_size / matmul_sec / 1e9
    llm_rate = llm_flops / llm_sec / 1e9
    return {
        "train_samples_per_sec": batch_size / train_sec,
        "eval_users_per_sec": n_users / eval_sec,
        "backbone_users_per_sec": n_users / backbone_sec,
        "peak_mem_mb": peak_memory_mb(),
        "llm_gflop_per_forward": llm_flops / 1e9,
        "llm_gflop_per_sec": llm_rate,
        "matmul_gflop_per_sec": matmul_rate,
        "llm_fraction_of_matmul": llm_rate / matmul_rate,
        "llm_layers": float(model.llm.config.num_hidden_layers),
        "prompt_tokens": float(tokens / micro[model.ITEM_SEQ].size(0)),
    }


def write(rows: list[tuple[str, dict[str, float]]], dataset: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recbole_llmalign import report

    csv_rows = [[dataset, "AlignLLMRec", setting, "cost", metric, value] for setting, values in rows
                for metric, value in values.items()]
    report.write_csv(csv_rows, RESULTS / f"{name}.csv")
    header = "| setting | prompt tokens | train samples/s | eval users/s | backbone users/s | peak MB | GFLOP per forward (32 users) | LLM GFLOP/s | matmul GFLOP/s | LLM / matmul |\n"
    header += "|---" * 10 + "|\n"
    lines = [f"| {setting} | {v['prompt_tokens']:.0f} | {v['train_samples_per_sec']:.1f} | {v['eval_users_per_sec']:.1f} | "
             f"{v['backbone_users_per_sec']:.0f} | {v['peak_mem_mb']:.0f} | {v['llm_gflop_per_forward']:.1f} | "
             f"{v['llm_gflop_per_sec']:.1f} | {v['matmul_gflop_per_sec']:.1f} | {v['llm_fraction_of_matmul']:.0%} |"
             for setting, v in rows]
    text = (f"# AlignLLMRec cost on {dataset} (2 CPU threads, fp32)\n\n"
            "Regenerated by `python benchmarks/align_llmrec_cost.py`. Train = forward + backward + Adam step on "
            "batches of `train_batch_size` samples; eval = full ranking of every item, one LLM pass per user; "
            "GFLOP/s = FLOPs counted by torch's flop counter for one micro-batch forward of the LLM / its time; "
            "matmul = a plain torch matmul (tokens x hidden x MLP width) timed in the same process.\n\n"
            + header + "\n".join(lines) + "\n")
    report.write_text(RESULTS / f"{name}.md", text)
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    labels = [setting for setting, _ in rows]
    for axis, metric, title in zip(axes, ("train_samples_per_sec", "eval_users_per_sec", "llm_fraction_of_matmul"),
                                   ("training samples / s", "evaluation users / s", "LLM GFLOP/s / matmul GFLOP/s")):
        axis.bar(labels, [values[metric] for _, values in rows], color="tab:blue")
        axis.set_title(title)
    figure.suptitle(f"AlignLLMRec cost on {dataset}")
    report.save_figure(figure, RESULTS / f"{name}.png", dpi=110)


def main() -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--layers", default="8,30", help="comma-separated llm_layers settings")
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--eval-users", type=int, default=128)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from argv: the script's own flags must not reach it
    name = args.name or f"align_llmrec_cost_{args.dataset.replace('-', '')}"
    rows = []
    context = multiprocessing.get_context("spawn")
    for layers in tqdm(args.layers.split(","), desc="llm_layers settings"):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            values = pool.submit(measure, args.dataset, int(layers), args.train_steps, args.eval_users).result()
        rows.append((f"llm_layers={layers}", values))
        write(rows, args.dataset, name)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
