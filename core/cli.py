"""`visionlens` console script: one subcommand per engine entry point.

Each subcommand's parser lives beside its engine module (``*_main(argv)``);
this file only routes, so ``visionlens X --help`` shows that module's options.
"""

from __future__ import annotations

import importlib
import logging
import sys

from .errors import VisionLensError

COMMANDS = {
    "demo": ("core.demo", "demo_main", "build the demo stores"),
    "ingest": ("core.ingest.run", "ingest_main", "build a store from COCO / VOC / ImageFolder / tables"),
    "cohort": ("core.cohorts", "cohort_main", "count and metrics of a cohort query string"),
    "eval-coco": ("core.metrics.detection", "eval_coco_main", "COCO bbox evaluation of two json files"),
    "precompute": ("core.cli", "precompute_main",
                   "explanations (--explain); with --engine, inference, metadata, matching and explanations in partitions"),
    "compact": ("core.cli", "compact_main", "fold a store's parts into a new base"),
    "slices": ("core.slices", "slices_main", "ranked error slices"),
    "compare": ("core.compare", "compare_main", "compare a baseline and a candidate model"),
    "report": ("core.report", "report_main", "PDF scorecard"),
    "label-quality": ("core.label_quality", "label_quality_main", "flag likely label errors from a model's predictions"),
    "embeddings": ("core.embeddings", "embeddings_main", "2-D embedding map and near-duplicate pairs"),
    "robustness": ("core.robustness", "robustness_main", "metrics under a perturbation swept over strengths"),
    "synthetic": ("core.synthetic", "synthetic_main", "a large synthetic store for scale benchmarks"),
}


def precompute_main(argv: list[str] | None = None) -> int:
    """``--engine`` runs the partitioned pipeline (``core.distributed``); otherwise explanations."""
    argv = list(argv or [])
    if any(arg == "--engine" or arg.startswith("--engine=") for arg in argv):
        from .distributed import distributed_main

        return distributed_main(argv)
    from .explain.precompute import precompute_main as explain_main

    return explain_main(argv)


def compact_main(argv: list[str] | None = None) -> int:
    import argparse

    from .store import compact

    parser = argparse.ArgumentParser(prog="visionlens compact", description=COMMANDS["compact"][2])
    parser.add_argument("store", help="path to NAME.duckdb")
    args = parser.parse_args(argv)
    paths = compact(args.store)
    print(f"compacted {paths.base}")
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: visionlens COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"visionlens: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        print(f"visionlens {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    try:
        return int(func(rest) or 0)
    except VisionLensError as exc:
        print(f"visionlens {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
