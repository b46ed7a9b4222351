"""Command line mirroring RecBole's ``run_recbole.py``, plus ``--compare`` and ``convert-amazon``.

    python run_recbole_llmalign.py --model=SASRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
    python run_recbole_llmalign.py --compare=SASRec,GRU4Rec,BERT4Rec,Pop --dataset=ml-100k [--seeds=2020,2021,2022]
        [--reference=SASRec] [--key=value ...]
    python run_recbole_llmalign.py convert-amazon --reviews=r.csv [--metadata=m.json] --name=my-data [--output_dir=dataset]
    python run_recbole_llmalign.py recommend --model_file=saved/<Model>-<time>.pth --user=<id> [--topk=10] [--explain] [--topk_cache=F]
        [--trust_checkpoint]
    python run_recbole_llmalign.py precompute --model_file=saved/<Model>-<time>.pth --output=saved/topk.pth [--topk=10] [--trust_checkpoint]
    python run_recbole_llmalign.py hyper --config_files="a.yaml" --params_file=hyper.test [--output_file=hyper_example.result]
        [--algo=exhaustive|random|bayes] [--max_evals=100] [--early_stop=10] [--display_file=F.html] [--key=value ...]

Any ``--key=value`` not listed here is a RecBole/plugin config override, exactly as in RecBole.
A known error (bad config key, unknown model or dataset, missing file, missing optional package)
prints one ``error: ...`` line and exits with code 2; ``--debug`` (or ``RECBOLE_LLMALIGN_DEBUG=1``)
shows its traceback instead.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

from recbole_llmalign.logs import quiet_third_party_warnings

# Errors whose message already says what to fix: the plugin's own checks (ValueError,
# FileNotFoundError), RecBole's config checks (raised as ConfigError, a ValueError) and
# "install X" for optional packages (ImportError). Anything else is a bug: it keeps its traceback.
# A checkpoint refused by the safe loader (safe_load.UnsafeCheckpointError) names the globals and the
# trust flag: it is a known error too.
KNOWN_ERRORS = (ValueError, FileNotFoundError, ImportError, pickle.UnpicklingError)
DEBUG_ENV = "RECBOLE_LLMALIGN_DEBUG"


def _main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="model name (plugin or RecBole)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    parser.add_argument("--compare", type=str, default=None,
                        help="comma-separated model names to run with one shared config and seed")
    parser.add_argument("--output_dir", type=str, default="saved/compare",
                        help="where --compare writes its .md/.csv/.png")
    parser.add_argument("--seeds", type=str, default=None,
                        help="with --compare: comma-separated seeds; every model runs once per seed, plus mean/std rows")
    parser.add_argument("--reference", type=str, default=None,
                        help="with --compare: model every other one is tested against (paired bootstrap of the "
                             "test NDCG@10 difference over users, pooled over seeds)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this node (RecBole's multi-process mode)")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all nodes (-1 = nproc)")
    parser.add_argument("--ip", type=str, default="localhost", help="address of the rank-0 node")
    parser.add_argument("--port", type=str, default="5678", help="port of the rank-0 node")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this node's first process")
    return parser


def _convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_recbole_llmalign.py convert-amazon",
                                     description="Convert Amazon review dumps into RecBole atomic files.")
    parser.add_argument("--reviews", required=True, help="reviews file: CSV (2014) or JSON lines (2014/2018/2023), .gz ok")
    parser.add_argument("--metadata", default=None, help="optional item metadata JSON lines")
    parser.add_argument("--name", required=True, help="dataset name (folder and file stem)")
    parser.add_argument("--output_dir", default="dataset", help="data_path to write <name>/ into")
    return parser


def _recommend_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_recbole_llmalign.py recommend",
                                     description="Top-K items for one user from a saved checkpoint.")
    parser.add_argument("--model_file", required=True, help="checkpoint written by a run (saved/<Model>-<time>.pth)")
    parser.add_argument("--user", required=True, help="external user id, as in the dataset's .inter file")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--explain", action="store_true",
                        help="one sentence per item (AlignLLMRec), written from its evidence (the closest history items by "
                             "the backbone's item vectors and the attributes they share), which is printed under it")
    parser.add_argument("--topk_cache", default=None, help="read the top-K from a file written by `precompute` (no model run)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load --model_file with full unpickling, which can run code: only for a file you trust "
                             "(by default only the globals RecBole and plugin checkpoints need are admitted)")
    return parser


def _precompute_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_recbole_llmalign.py precompute",
                                     description="Write every user's top-K from a saved checkpoint into one verified file.")
    parser.add_argument("--model_file", required=True, help="checkpoint written by a run (saved/<Model>-<time>.pth)")
    parser.add_argument("--output", required=True, help="top-K file to write (atomically)")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64, help="users per beam search / scoring call")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load --model_file with full unpickling, which can run code: only for a file you trust "
                             "(by default only the globals RecBole and plugin checkpoints need are admitted)")
    return parser


def parse_seeds(text: str | None, argv: list[str]) -> list[int] | None:
    """``--seeds=2020,2021`` as integers; refused beside ``--seed``, which RecBole would apply to every run."""
    if not text:
        return None
    if any(arg.startswith("--seed=") for arg in argv):
        raise ValueError("--seeds and --seed were both given: --seed would override every seed of --seeds; drop one.")
    try:
        return [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers (e.g. --seeds=2020,2021,2022), got {text!r}.") from None


def _hyper_parser() -> argparse.ArgumentParser:
    from recbole_llmalign.hyper import ALGOS

    parser = argparse.ArgumentParser(prog="run_recbole_llmalign.py hyper",
                                     description="Tune hyperparameters with RecBole's HyperTuning (as RecBole's run_hyper.py).")
    parser.add_argument("--config_files", default=None, help="fixed config files, space-separated (model, dataset, ...)")
    parser.add_argument("--params_file", required=True,
                        help="search space, one parameter a line in RecBole's format: `learning_rate choice [0.01,0.001]`, "
                             "`dropout uniform 0.1,0.5`, `x quniform low,high,q`, `lr loguniform -8,0`")
    parser.add_argument("--output_file", default="hyper_example.result", help="every trial's valid and test results")
    parser.add_argument("--display_file", default=None, help="HTML chart of the valid score per trial")
    parser.add_argument("--tool", default="hyperopt", help="tuning tool: hyperopt (ray-based tuning is not offered)")
    parser.add_argument("--algo", default="exhaustive", choices=ALGOS,
                        help="exhaustive: every combination of `choice` values; random; bayes (TPE)")
    parser.add_argument("--max_evals", type=int, default=100, help="settings random/bayes try (exhaustive: the grid size)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without a better valid score")
    return parser


def _hyper(argv: list[str]) -> int:
    from recbole.utils.utils import dict2str

    from recbole_llmalign.hyper import best_result, hyper_tune

    args, overrides = _hyper_parser().parse_known_args(argv)
    if args.tool.lower() != "hyperopt":
        raise ValueError(f"--tool={args.tool} is not offered: use --tool=hyperopt (RecBole 1.2.1's ray tuning needs the "
                         "ray<=2.6.3 API, Python 3.11 only).")
    sys.argv = sys.argv[:1] + overrides  # RecBole's Config reads the other --key=value as config overrides, as in run_hyper.py
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    tuner = hyper_tune(args.params_file, config_file_list, args.output_file, args.algo, args.max_evals, args.early_stop,
                       args.display_file)
    best = best_result(tuner)
    print(f"best params: {tuner.best_params}")
    print(f"best valid score: {float(best['best_valid_score']):.4f}")
    print(f"best valid result: {dict2str(best['best_valid_result'])}")
    print(f"best test result: {dict2str(best['test_result'])}")
    print(f"every trial: {args.output_file}")
    return 0


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line, or RECBOLE_LLMALIGN_DEBUG set to anything but 0/false/no."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a known error becomes one ``error: ...`` line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_warnings()  # each run then applies its config's quiet_third_party_warnings
    debug = debug_requested(argv)
    if "--debug" in argv:  # RecBole's Config reads sys.argv itself and would warn about the flag
        argv = [arg for arg in argv if arg != "--debug"]
        sys.argv = [arg for arg in sys.argv if arg != "--debug"]
    try:
        return _run(argv)
    except KNOWN_ERRORS as error:
        if debug:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "hyper":
        return _hyper(argv[1:])
    if argv and argv[0] == "recommend":
        from recbole_llmalign.recommend import recommend

        args = _recommend_parser().parse_args(argv[1:])
        sys.argv = sys.argv[:1]  # RecBole's Config would read the subcommand's flags as config keys
        if args.topk_cache:
            from recbole_llmalign.recommend import recommend_from_cache

            print(recommend_from_cache(args.model_file, args.topk_cache, args.user, args.topk, trust=args.trust_checkpoint).render())
        else:
            print(recommend(args.model_file, args.user, args.topk, args.explain, trust=args.trust_checkpoint).render())
        return 0
    if argv and argv[0] == "precompute":
        from recbole_llmalign.serving import precompute_topk

        args = _precompute_parser().parse_args(argv[1:])
        sys.argv = sys.argv[:1]
        path = precompute_topk(args.model_file, args.output, args.topk, args.batch_size, trust=args.trust_checkpoint)
        print(f"wrote {path}")
        return 0
    if argv and argv[0] == "convert-amazon":
        from recbole_llmalign.data import convert_amazon

        args = _convert_parser().parse_args(argv[1:])
        folder = convert_amazon(args.reviews, args.output_dir, args.name, args.metadata)
        print(f"wrote {folder}; run with --dataset={args.name} --data_path={args.output_dir}")
        return 0

    args, _ = _main_parser().parse_known_args(argv)
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    from recbole_llmalign.quick_start import compare, run_recbole_llmalign

    if args.compare:
        models = [m.strip() for m in args.compare.split(",") if m.strip()]
        compare(models, args.dataset, config_file_list, output_dir=args.output_dir, seeds=parse_seeds(args.seeds, argv),
                reference=args.reference)
    else:
        run_recbole_llmalign(model=args.model, dataset=args.dataset, config_file_list=config_file_list, nproc=args.nproc,
                             world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
    return 0
