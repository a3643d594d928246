"""The ``mop-torchrl`` command line: ``train``, ``eval``, ``demos``, ``bench``, ``routes``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _train(args: argparse.Namespace) -> None:
    from mop_torchrl.train import load_config, resume, train

    overrides = {
        k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "func")
    }
    if args.resume:
        if overrides or args.config:
            raise SystemExit("--resume takes the run's saved config: give no other options")
        resume(args.resume)
        return
    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"mop-torchrl train: {err}") from None
    train(config)


def _eval(args: argparse.Namespace) -> None:
    from mop_torchrl.train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        episodes=args.episodes,
        seed=args.seed,
        num_envs=args.num_envs,
        task_id=args.task_id,
        weight_threshold=args.threshold,
        disable_largest=args.disable_largest,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


def build_parser() -> argparse.ArgumentParser:
    from mop_torchrl.train.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="mop-torchrl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (imitation, bc or ppo)")
    train.add_argument("--config", help="YAML config file (configs/*.yaml)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    add_config_arguments(train)
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on held-out episodes")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint.pt or its run dir")
    evaluate.add_argument("--episodes", type=int, default=100)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--num_envs", type=int, default=8)
    evaluate.add_argument("--task_id", default=None, help="level (default: the training one)")
    evaluate.add_argument("--threshold", type=float, default=0.0, help="MoP weight threshold τ")
    evaluate.add_argument("--disable-largest", action="store_true", help="MoP: no largest expert")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mop-torchrl`` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
