"""The ``mop-torchrl`` command line: ``train``, ``eval``, ``demos``, ``bench``, ``routes``.

``train``'s flags are generated from :class:`~mop_torchrl.train.config.TrainConfig`
(``--num_envs``, ``--mop.layers`` and its flat alias ``--mop_layers`` ...). Every flag is spelt
with underscores, and the level(s) are ``--task_id`` in every command; the older spellings
(``--disable-largest``, ``routes --level`` ...) still work but are not listed in ``--help``.

Errors a user can cause (bad config or flags, unusable files or directories, a run that cannot
start) print one line on stderr and exit non-zero (2 for usage and config errors, 1 for the
others, 130 after Ctrl-C, 143 after SIGTERM); anything else is a bug and keeps its traceback.
SIGTERM (what schedulers send) is handled like Ctrl-C: a training run saves a checkpoint of
the current update first; elsewhere the command stops, cleaning up its workers.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]

USAGE_ERROR = 2
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM


def _fail(command: str, err: object, code: int = 1) -> NoReturn:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{f'mop-torchrl {command}'.strip()}: {message}", file=sys.stderr)
    sys.exit(code)


def _train(args: argparse.Namespace) -> None:
    from mop_torchrl.train import load_config, resume_config, train

    skip = ("command", "config", "resume", "overwrite", "func")
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        if args.resume and args.config:
            raise ValueError("--resume uses the run's saved config: drop --config")
        if args.resume:
            config = resume_config(args.resume, overrides)
        else:
            config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        _fail("train", err, USAGE_ERROR)
    train(config, resume=bool(args.resume), overwrite=args.overwrite)


def _eval(args: argparse.Namespace) -> None:
    from mop_torchrl.babyai.levels import resolve_levels
    from mop_torchrl.train.evaluate import evaluate_checkpoint

    if args.task_id is not None:
        try:
            resolve_levels(args.task_id)
        except ValueError as err:
            _fail("eval", err, USAGE_ERROR)
    result = evaluate_checkpoint(
        args.checkpoint,
        episodes=args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        task_id=args.task_id,
        weight_threshold=args.threshold,
        disable_largest=args.disable_largest,
        probe_episodes=args.probe_episodes,
        sample=args.sample,
    )
    if args.json:
        print(json.dumps(result))
    else:
        levels = result.pop("levels", {})
        for key, value in result.items():
            print(f"{key:>16}: {value}")
        for name, per_level in levels.items():
            print(
                f"{name:>24}: success {per_level['success_rate']:.3f}, return "
                f"{per_level['mean_return']:.3f}, routing cost {per_level['routing_cost']}"
            )


def _demos(args: argparse.Namespace) -> None:
    from mop_torchrl.babyai.demos import DemoError, generate_demos

    if args.task_id is None:
        _fail("demos", "the following arguments are required: --task_id (see --help)", 2)
    try:
        summary = generate_demos(
            args.task_id,
            args.episodes,
            args.out,
            num_workers=args.workers,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (DemoError, ValueError) as err:
        _fail("demos", err, USAGE_ERROR if not isinstance(err, DemoError) else 1)
    print(
        f"wrote {summary['episodes']} episodes ({summary['frames']} frames) of {summary['level']} "
        f"in {summary['seconds']:.1f} s: {summary['steps_per_s']:.0f} steps/s, "
        f"bot success {summary['success_rate']:.2f}"
    )
    print(
        f"  {summary['path']}: {summary['total_episodes']} episodes, "
        f"{summary['total_frames']} frames in total"
    )


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in [0, 1), got {text!r}"
        )
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _seed(text: str) -> int:
    from mop_torchrl.train.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _routes(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mop_torchrl.analysis import plot_all, summarise, write_summary
    from mop_torchrl.analysis.record import mop_cores, record_routes, sweep_ablation
    from mop_torchrl.babyai.levels import resolve_levels
    from mop_torchrl.train.policy import load_actor

    actor, config = load_actor(args.checkpoint)
    try:
        layers = [list(block) for block in mop_cores(actor)[0].config.layers]
        level = ",".join(resolve_levels(args.task_id or config.task_id))
    except ValueError as err:
        _fail("routes", err, USAGE_ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, before any work
    routes, episodes = record_routes(
        actor,
        level,
        args.episodes,
        seed=args.seed,
        out_dir=out,
        weight_threshold=args.threshold,
        disable_largest=args.disable_largest,
    )
    summary = write_summary(summarise(routes, layers), out / "summary")
    ablation = None
    if args.sweep:
        ablation = sweep_ablation(
            actor,
            level,
            episodes=args.sweep_episodes or args.episodes,
            thresholds=args.sweep_thresholds,
            seed=args.seed,
        )
        ablation.to_csv(out / "ablation.csv", index=False)
    plots = plot_all(
        routes,
        episodes,
        layers,
        out / "plots",
        ablation_df=ablation,
        max_episodes=args.plot_episodes,
        frames_root=out,
    )
    success = routes.groupby("episode")["success"].first().mean()
    print(
        f"recorded {len(episodes)} episodes ({len(routes)} steps) of {level}: success {success:.2f}"
    )
    tables = "csv, parquet"
    print(f"  tables:  {out / 'routes'}.{{{tables}}}, {out / 'episodes'}.{{{tables}}}")
    print(f"  frames:  {out / 'frames'}/ ({len(episodes)} PNG)")
    print(f"  summary: {summary[-1]} (+ {len(summary) - 1} CSV)")
    if ablation is not None:
        print(f"  ablation: {out / 'ablation.csv'}")
    print(f"  plots:   {out / 'plots'}/ ({len(plots)} PNG)")


def _old_spelling(parser: argparse.ArgumentParser, flag: str, dest: str, **kwargs) -> None:
    """Accepts a flag's earlier spelling (``--disable-largest``, ``--level``) without listing it."""
    parser.add_argument(flag, dest=dest, help=argparse.SUPPRESS, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the full usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        _fail(self.prog.removeprefix("mop-torchrl").strip(), f"{message} (see --help)", 2)


def build_parser() -> argparse.ArgumentParser:
    from mop_torchrl.train.config import add_config_arguments

    parser = _Parser(prog="mop-torchrl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (imitation, bc or ppo)")
    train.add_argument("--config", help="YAML config file (configs/*.yaml)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    train.add_argument(
        "--overwrite", action="store_true", help="delete an existing run of the same name first"
    )
    add_config_arguments(train)
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on held-out episodes")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run dir")
    evaluate.add_argument(
        "--episodes", type=_positive_int, default=100, help="episodes (per level)"
    )
    evaluate.add_argument("--seed", type=_seed, default=0)
    evaluate.add_argument("--num_envs", type=_positive_int, default=8)
    evaluate.add_argument(
        "--probe_episodes",
        type=_non_negative_int,
        default=64,
        help="bot-driven episodes for the grounding probe (label accuracy with true vs "
        "shuffled missions); 0 skips it",
    )
    evaluate.add_argument(
        "--task_id", default=None, help="level(s), comma-separated (default: every training level)"
    )
    evaluate.add_argument("--threshold", type=_fraction, default=0.0, help="MoP weight threshold τ")
    evaluate.add_argument("--disable_largest", action="store_true", help="MoP: no largest expert")
    evaluate.add_argument(
        "--sample",
        action="store_true",
        help="draw each action from the policy (default: the most probable, as BabyAI validates)",
    )
    _old_spelling(evaluate, "--disable-largest", "disable_largest", action="store_true")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_eval)

    demos = commands.add_parser(
        "demos", help="generate BabyAI bot demonstrations into an on-disk replay buffer"
    )
    demos.add_argument("--task_id", help="BabyAI level (GoToLocal or full id); required")
    _old_spelling(demos, "--level", "task_id")
    demos.add_argument("--episodes", type=_positive_int, required=True, help="episodes to add")
    demos.add_argument("--out", required=True, help="demo directory (appends if it exists)")
    demos.add_argument("--workers", type=_positive_int, default=2, help="worker processes")
    demos.add_argument("--seed", type=_seed, default=0)
    demos.add_argument("--quiet", action="store_true", help="no progress lines")
    demos.set_defaults(func=_demos)

    routes = commands.add_parser(
        "routes", help="record a MoP policy's routing on BabyAI episodes, summarise and plot it"
    )
    routes.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run dir")
    routes.add_argument(
        "--episodes", type=_positive_int, default=10, help="episodes to record (per level)"
    )
    routes.add_argument("--out", required=True, help="output folder")
    routes.add_argument(
        "--task_id", default=None, help="level(s), comma-separated (default: every training level)"
    )
    _old_spelling(routes, "--level", "task_id")
    routes.add_argument("--seed", type=_seed, default=0)
    routes.add_argument("--threshold", type=_fraction, default=0.0, help="MoP weight threshold τ")
    routes.add_argument("--disable_largest", action="store_true", help="MoP: no largest expert")
    routes.add_argument("--sweep", action="store_true", help="also run the ablation sweep")
    routes.add_argument(
        "--sweep_thresholds",
        type=_floats,
        default=(0.0, 0.1, 0.2, 0.3),
        help="comma-separated τ values of the sweep, each with and without the largest expert",
    )
    routes.add_argument(
        "--sweep_episodes",
        type=_positive_int,
        default=None,
        help="episodes per sweep setting (--episodes)",
    )
    routes.add_argument(
        "--plot_episodes",
        type=_positive_int,
        default=3,
        help="episodes with their own spatial/timeline",
    )
    _old_spelling(routes, "--disable-largest", "disable_largest", action="store_true")
    _old_spelling(routes, "--sweep-thresholds", "sweep_thresholds", type=_floats)
    _old_spelling(routes, "--sweep-episodes", "sweep_episodes", type=_positive_int)
    _old_spelling(routes, "--plot-episodes", "plot_episodes", type=_positive_int)
    routes.set_defaults(func=_routes)
    # Listed for --help; `main` hands its arguments to mop_torchrl.bench's own parser.
    commands.add_parser("bench", help="policy step / recurrent training throughput benchmarks")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mop-torchrl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from mop_torchrl import bench

        bench.main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    from mop_torchrl.babyai.demos import DemoError
    from mop_torchrl.train.checkpoint import CheckpointError
    from mop_torchrl.train.run import NonFiniteLossError, RunInterrupted
    from mop_torchrl.train.run_folder import RunError
    from mop_torchrl.train.signals import Terminated, raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        args.func(args)
    except RunInterrupted as err:
        _fail(args.command, err, err.exit_code)
    except Terminated:
        _fail(args.command, "terminated (SIGTERM)", TERMINATED)
    except KeyboardInterrupt:
        _fail(args.command, "interrupted", INTERRUPTED)
    except (CheckpointError, DemoError, RunError, NonFiniteLossError, OSError) as err:
        _fail(args.command, err)


if __name__ == "__main__":
    main()
