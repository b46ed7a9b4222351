"""Command line mirroring RecBole's ``run_recbole.py``, plus ``--compare`` and ``convert-amazon``.

    python run_recbole_llmalign.py --model=SASRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
    python run_recbole_llmalign.py --compare=SASRec,GRU4Rec,BERT4Rec,Pop --dataset=ml-100k [--key=value ...]
    python run_recbole_llmalign.py convert-amazon --reviews=r.csv [--metadata=m.json] --name=my-data [--output_dir=dataset]
    python run_recbole_llmalign.py recommend --model_file=saved/<Model>-<time>.pth --user=<id> [--topk=10] [--explain] [--topk_cache=F]
    python run_recbole_llmalign.py precompute --model_file=saved/<Model>-<time>.pth --output=saved/topk.pth [--topk=10]

Any ``--key=value`` not listed here is a RecBole/plugin config override, exactly as in RecBole.
"""

from __future__ import annotations

import argparse
import sys


def _main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="model name (plugin or RecBole)")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    parser.add_argument("--compare", type=str, default=None,
                        help="comma-separated model names to run with one shared config and seed")
    parser.add_argument("--output_dir", type=str, default="saved/compare",
                        help="where --compare writes its .md/.csv/.png")
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
    parser.add_argument("--explain", action="store_true", help="one LLM-generated reason per item (AlignLLMRec)")
    parser.add_argument("--topk_cache", default=None, help="read the top-K from a file written by `precompute` (no model run)")
    return parser


def _precompute_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run_recbole_llmalign.py precompute",
                                     description="Write every user's top-K from a saved checkpoint into one verified file.")
    parser.add_argument("--model_file", required=True, help="checkpoint written by a run (saved/<Model>-<time>.pth)")
    parser.add_argument("--output", required=True, help="top-K file to write (atomically)")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64, help="users per beam search / scoring call")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "recommend":
        from recbole_llmalign.recommend import recommend

        args = _recommend_parser().parse_args(argv[1:])
        sys.argv = sys.argv[:1]  # RecBole's Config would read the subcommand's flags as config keys
        if args.topk_cache:
            from recbole_llmalign.recommend import recommend_from_cache

            print(recommend_from_cache(args.model_file, args.topk_cache, args.user, args.topk).render())
        else:
            print(recommend(args.model_file, args.user, args.topk, args.explain).render())
        return 0
    if argv and argv[0] == "precompute":
        from recbole_llmalign.serving import precompute_topk

        args = _precompute_parser().parse_args(argv[1:])
        sys.argv = sys.argv[:1]
        path = precompute_topk(args.model_file, args.output, args.topk, args.batch_size)
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
        compare(models, args.dataset, config_file_list, output_dir=args.output_dir)
    else:
        run_recbole_llmalign(model=args.model, dataset=args.dataset, config_file_list=config_file_list, nproc=args.nproc,
                             world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
    return 0
