"""``llmrl pbt --config RECIPE --space SPACE.yaml --population 4 --interval 25 [--out DIR] [section.key=value ...]``:
population-based training on Ray Tune (``llmrl.pbt``). It parses the command line and calls ``llmrl.tune.pbt.pbt``,
as a Python program would."""
from __future__ import annotations

import sys

from llmrl.cli.console import config_parser, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("Population-based training (Ray Tune's PopulationBasedTraining): members train side by "
                           "side; every --interval steps the worst --quantile continue from a better member's "
                           "checkpoint with perturbed hyper-parameters. docs/tuning.md says more.",
                           "YAML recipe, e.g. configs/tiny.yaml")
    parser.add_argument("--space", required=True, help="YAML of the hyper-parameters to vary and their ranges (only "
                                                       "keys a run may change part-way: train.lr, ppo.init_kl_coef, "
                                                       "critic_free.kl_coef, generation.temperature, ppo.clip_range)")
    parser.add_argument("--population", type=int, default=4, help="members (default 4)")
    parser.add_argument("--interval", type=int, required=True,
                        help="steps between a member's reports (evaluation, checkpoint, perhaps an exploit): Ray's "
                             "perturbation_interval")
    parser.add_argument("--total-steps", type=int, default=None, help="steps of each member (default: the recipe's "
                                                                      "train.total_steps)")
    parser.add_argument("--out", default=None, help="folder of the population (default: run.output_dir + '-pbt'); "
                                                    "must be new or empty")
    parser.add_argument("--metric", default="eval/reward", help="the logged metric members are ranked by "
                                                                "(default eval/reward)")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    parser.add_argument("--quantile", type=float, default=0.25,
                        help="share of members that exploit one of the same share at the top (Ray's "
                             "quantile_fraction; default 0.25)")
    parser.add_argument("--resample-probability", type=float, default=0.25,
                        help="chance that an exploiting member's value is drawn anew from the space instead of "
                             "perturbed (Ray's resample_probability; default 0.25)")
    parser.add_argument("--perturbation-factors", type=float, nargs="+", default=[1.2, 0.8],
                        help="a perturbed value is the donor's times one of these (Ray's perturbation_factors; "
                             "default 1.2 0.8)")
    parser.add_argument("--workers", type=int, default=None,
                        help="members training at once (default: one per CPU core, up to --population); the cores "
                             "are split between them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial sample and the perturbations")
    parser.add_argument("--synch", action="store_true",
                        help="synchronous PBT (Ray's synch): at each interval every member waits for the others; "
                             "reproducible, but each member restarts at every interval")
    args = parser.parse_intermixed_args(argv)

    def body():
        from llmrl.tune.pbt import pbt

        result = pbt(args.config, args.space, population=args.population, interval=args.interval,
                     total_steps=args.total_steps, out_dir=args.out, metric=args.metric, direction=args.direction,
                     quantile=args.quantile, resample_probability=args.resample_probability,
                     perturbation_factors=tuple(args.perturbation_factors), workers=args.workers, seed=args.seed,
                     synch=args.synch, overrides=args.overrides)
        print(f"population: {result.table} ({result.plot}); best: "
              + (f"member-{result.best['member']} {args.metric} {result.best['metric']:.4f}, replay with llmrl "
                 f"train --config {result.out_dir}/members/member-{result.best['member']}/replay.yaml"
                 if result.best else "none finished"), flush=True)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
