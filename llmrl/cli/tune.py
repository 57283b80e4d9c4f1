"""``llmrl tune --config RECIPE --space SPACE.yaml --trials N [section.key=value ...]``: a hyper-parameter search
(Optuna), each trial an ordinary run folder in OUT/trials/. It parses the command line and calls
``llmrl.tune.search.tune``, as a Python program would. ``llmrl tune --report --storage URL``: the report of a
study again (``llmrl.tune.report.main_report``)."""
from __future__ import annotations

import argparse
import sys

from llmrl.cli.console import config_parser, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from llmrl.tune.search import HEARTBEAT_SECONDS, PRUNERS, SAMPLERS

    parser = config_parser("Search a recipe's hyper-parameters with Optuna: each trial is a run of the recipe with "
                           "the trial's values as overrides, in OUT/trials/trial-NNNN; the study is kept in "
                           "OUT/study.db (or --storage) and the same command again continues it.",
                           "YAML recipe, e.g. configs/tiny.yaml", required=False,
                           overrides_help="overrides of the recipe for every trial: section.key=value")
    parser.add_argument("--space", help="YAML of config keys and ranges, e.g. train.lr: {type: float, low: 1.0e-5, "
                                        "high: 1.0e-2, log: true}")
    parser.add_argument("--report", action="store_true",
                        help="only write the report of the study in --storage again (best.yaml, the table, the "
                             "plots; into --out, default the sqlite file's folder)")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials the study ends with (completed, pruned and failed ones count)")
    parser.add_argument("--out", default=None, help="the study's folder (default: run.output_dir + '-tune')")
    parser.add_argument("--metric", default="eval/reward",
                        help="the objective: a metric the runs log, at its last logged value (default eval/reward, "
                             "the held-out reward after the last step)")
    parser.add_argument("--direction", default="maximize", help="maximize (default) or minimize the metric")
    parser.add_argument("--sampler", default="tpe", help=f"Optuna sampler: {', '.join(SAMPLERS)} (default tpe)")
    parser.add_argument("--pruner", default="median", help=f"Optuna pruner: {', '.join(PRUNERS)} (default median)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage: a database URL (sqlite:///PATH, postgresql://..., mysql://...) or "
                             "journal:PATH (default sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default=None, help="the study's name in the storage (default: OUT's name)")
    parser.add_argument("--workers", type=int, default=1,
                        help="trial processes on this machine sharing the study, the CPU threads split between them")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    parser.add_argument("--heartbeat", type=int, default=HEARTBEAT_SECONDS,
                        help=f"seconds between a running trial's heartbeats (default {HEARTBEAT_SECONDS}); a trial "
                             f"silent for twice this (its worker was killed) is marked FAIL and retried once")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a worker that --workers started
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # its share of the threads
    args = parser.parse_intermixed_args(argv)
    if args.report:
        if args.storage is None:
            parser.error("--report needs --storage, e.g. --storage sqlite:///runs/tiny-tune/study.db")
    elif not args.worker and (args.config is None or args.space is None or args.trials is None):
        parser.error("--config RECIPE, --space SPACE.yaml and --trials N are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        from llmrl.tune.report import main_report

        return run_cli(lambda: main_report(args.storage, args.study_name, args.out))
    if args.worker:
        from pathlib import Path

        from llmrl.tune.search import run_worker

        return run_cli(lambda: run_worker(args.storage, args.study_name, Path(args.out), args.trials, args.sampler,
                                          args.pruner, args.seed, args.heartbeat, args.threads))

    def body():
        from llmrl.tune.search import tune

        result = tune(args.config, args.space, trials=args.trials, out_dir=args.out, metric=args.metric,
                      direction=args.direction, sampler=args.sampler, pruner=args.pruner, storage=args.storage,
                      study_name=args.study_name, workers=args.workers, seed=args.seed, overrides=args.overrides,
                      heartbeat=args.heartbeat)
        if result.report is not None:
            print(result.report["summary"], flush=True)
        if result.best_value is None:
            print(f"no trial completed; the study is in {result.out_dir}", flush=True)
        else:
            print(f"best: {args.metric} {result.best_value:.4f} with {result.best_params}; run folder "
                  f"{result.best_run_dir}", flush=True)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
