"""Recurrent DQN on masked CartPole (R2D2's recipe, small), with a MoP, GRU or LSTM core.

    python examples/recurrent_dqn.py --core gru
    python examples/recurrent_dqn.py --core mop --out dqn_mop.json

The env and the cores are ``masked_control.py``'s (CartPole observing the cart position and the
pole angle only: the velocities have to be inferred from memory). The TorchRL parts are those of
the recurrent-DQN tutorial (the core's primer on the env, ``QValueModule`` behind the core,
``EGreedyModule`` exploration, a ``Collector`` and a replay buffer). What recurrent Q-learning
needs beyond that tutorial is R2D2's (Kapturowski et al., 2019), so the loss is written here:

* **stored states + burn-in**: the buffer keeps whole ``--seq_len``-step rows of one env, with
  the hidden state the collector stored at every step. A row is replayed from the state stored
  at its first step (``set_recurrent_mode(True)``), and its first ``--burn_in`` steps only
  refresh that state: they get no loss;
* **n-step double-DQN targets**: ``Σ_k γ^k r_{t+k} + γ^n Q_target(s_{t+n}, argmax_a
  Q(s_{t+n}, a))``, cut at the end of an episode; both networks run over the same row;
* **fixed observation scaling** (the space's bounds, not ``VecNorm``'s running statistics, so
  that old rows in the buffer are normalised as new ones are);
* **a replay ratio that works**: ``--updates_per_batch`` updates of ``--batch_rows`` rows per
  collected batch, a Polyak-averaged target network (``--tau``), Huber loss, gradient norm 10.

``DQNLoss`` is not used: it computes one-step targets from ``("next", ...)`` entries and has no
burn-in. A core sees ``is_init`` inside a row, so rows may cross episode boundaries. With
``--core mop`` the routing cost of the replay is added in the plain form ``α·cost``
(``DEFAULT_RL_ALPHA``, as in ``recurrent_ppo.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.modules import EGreedyModule, QValueModule, set_recurrent_mode
from torchrl.modules.utils import get_primers_from_module

from mop_torchrl import routing_cost_loss
from mop_torchrl.core.config import DEFAULT_RL_ALPHA

from masked_control import (  # beside this script
    configure_torch,
    finished_episodes,
    greedy_returns,
    make_core,
    make_env,
    reached_return,
)


def make_qnet(
    core_kind: str,
    obs_dim: int,
    num_actions: int,
    hidden: int,
    dropout_beta: float | None = None,
    mop_layers: str | None = None,
) -> TensorDictSequential:
    """``observation → core → Linear(64)+ReLU → Q-values → QValueModule`` (greedy action)."""
    core = make_core(core_kind, obs_dim, hidden, "q", dropout_beta, mop_layers)
    width = 64 if core_kind == "mop" else hidden
    head = TensorDictModule(
        nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, num_actions)),
        ["q_features"],
        ["action_value"],
    )
    return TensorDictSequential(core, head, QValueModule(action_space="categorical"))


def n_step_targets(
    rows: TensorDictBase, q_next: torch.Tensor, gamma: float, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n-step double-DQN targets for steps ``0 .. T-n-1`` of ``rows [B, T]``, and where they
    are valid.

    ``q_next [B, T]`` is the target network's value of the online network's greedy action at
    every step. A terminal step ends the sum (no bootstrap); a sum that meets a truncation
    (time limit: the next state is not in the row) is left out (invalid).
    """
    reward = rows["next", "reward"].squeeze(-1)
    done = rows["next", "done"].squeeze(-1).float()
    truncated = (rows["next", "done"] & ~rows["next", "terminated"]).squeeze(-1).float()
    steps = reward.shape[1] - n
    target = torch.zeros_like(reward[:, :steps])
    alive = torch.ones_like(target)  # no episode end before step t + k
    valid = torch.ones_like(target)
    for k in range(n):
        target = target + alive * gamma**k * reward[:, k : k + steps]
        valid = valid * (1 - alive * truncated[:, k : k + steps])
        alive = alive * (1 - done[:, k : k + steps])
    target = target + alive * gamma**n * q_next[:, n:]
    return target, valid.bool()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--core", choices=["mop", "gru", "lstm"], default="mop")
    parser.add_argument("--frames", type=int, default=300_000, help="env steps in total")
    parser.add_argument("--num_envs", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64, help="steps per stored row")
    parser.add_argument("--burn_in", type=int, default=16, help="first steps of a row: no loss")
    parser.add_argument("--n_step", type=int, default=3)
    parser.add_argument("--batch_rows", type=int, default=32, help="rows per update")
    parser.add_argument("--updates_per_batch", type=int, default=8)
    parser.add_argument("--buffer_frames", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=5_000, help="frames before learning")
    parser.add_argument("--eps_frames", type=int, default=50_000, help="ε from 1 to --eps_end")
    parser.add_argument("--eps_end", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--tau", type=float, default=0.05, help="target network averaging")
    parser.add_argument("--reward_scale", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=64, help="GRU/LSTM hidden size")
    parser.add_argument(
        "--dropout_beta", type=float, help="MoP expert dropout (default: the preset's)"
    )
    parser.add_argument(
        "--mop_layers",
        help='MoP expert sizes per block (default: the paper preset\'s "0,16,32" x 3)',
    )
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_RL_ALPHA, help="routing cost weight (plain form)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_wall_s", type=float, default=None, help="stop early after this")
    parser.add_argument(
        "--stop_return",
        type=float,
        default=None,
        help="stop after the batch in which the mean return of --stop_window consecutive "
        "episodes first reaches this",
    )
    parser.add_argument("--stop_window", type=int, default=100)
    parser.add_argument("--out", help="write the learning curve and routing here (JSON)")
    args = parser.parse_args(argv)
    if not 0 <= args.burn_in < args.seq_len - args.n_step:
        parser.error("need 0 <= --burn_in < --seq_len - --n_step (steps left to learn from)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Trains and returns the curve (per finished episode: frames so far, return), the losses,
    the MoP routing of the last batches and the last collected batch."""
    args = parse_args(argv)
    configure_torch(args.seed)
    env = make_env("cartpole", args.num_envs, args.seed, args.reward_scale, running_norm=False)
    obs_dim = env.observation_spec["observation"].shape[-1]
    qnet = make_qnet(
        args.core,
        obs_dim,
        env.action_spec_unbatched.n,
        args.hidden,
        args.dropout_beta,
        args.mop_layers,
    )
    core = qnet[0]
    env.append_transform(get_primers_from_module(core))
    target_qnet = copy.deepcopy(qnet).requires_grad_(False)
    explore = EGreedyModule(
        env.action_spec, eps_init=1.0, eps_end=args.eps_end, annealing_num_steps=args.eps_frames
    )
    optimizer = torch.optim.Adam(qnet.parameters(), lr=args.lr)
    # The routing cost of the online network's (differentiable) replay, captured from the core.
    costs: list[torch.Tensor] = []
    if args.core == "mop":
        core.register_forward_hook(
            lambda m, _i, out: costs.append(out[m.cost_key]) if torch.is_grad_enabled() else None
        )
    frames_per_batch = args.num_envs * args.seq_len
    collector = Collector(
        env,
        TensorDictSequential(qnet, explore),
        frames_per_batch=frames_per_batch,
        total_frames=args.frames,
    )
    # One item per env row of a batch: [seq_len] steps in order, with their stored states.
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(max(1, args.buffer_frames // args.seq_len)),
        batch_size=args.batch_rows,
    )

    curve, losses, routing = [], [], []
    frames, start, reached = 0, time.perf_counter(), False
    for batch in collector:  # [env, time]
        if args.max_wall_s is not None and time.perf_counter() - start > args.max_wall_s:
            break
        frames += batch.numel()
        explore.step(batch.numel())
        curve += finished_episodes(batch, frames)
        if args.core == "mop":
            routing.append([batch[key].mean((0, 1)) for key in core.routing_keys])
        buffer.extend(batch)
        for _ in range(args.updates_per_batch if frames >= args.warmup else 0):
            rows = buffer.sample()  # [batch_rows, seq_len]
            costs.clear()
            with set_recurrent_mode(True):
                q = qnet(rows.clone())["action_value"]
                with torch.no_grad():
                    q_target = target_qnet(rows.clone())["action_value"]
            greedy = q.detach().argmax(-1, keepdim=True)
            target, valid = n_step_targets(
                rows, q_target.gather(-1, greedy).squeeze(-1), args.gamma, args.n_step
            )
            steps = target.shape[1]
            q_taken = q.gather(-1, rows["action"].unsqueeze(-1)).squeeze(-1)[:, :steps]
            valid[:, : args.burn_in] = False  # burn-in: the stored state is refreshed only
            loss = F.smooth_l1_loss(q_taken[valid], target[valid])
            if costs:
                cost = costs[0][:, args.burn_in :].flatten()
                loss = routing_cost_loss(loss, cost, args.alpha, mode="plain")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(qnet.parameters(), 10.0)
            optimizer.step()
            with torch.no_grad():
                for p, p_target in zip(qnet.parameters(), target_qnet.parameters()):
                    p_target.lerp_(p, args.tau)
            losses.append(loss.item())
        recent = [r for _, r in curve[-20:]]
        reached = reached_return(curve, args.stop_return, args.stop_window)
        print(
            f"frames {frames:>7}  ε {explore.eps.item():.2f}  "
            f"loss {losses[-1] if losses else float('nan'):.4f}  "
            f"return(last 20) {sum(recent) / max(len(recent), 1):7.1f}  "
            f"{time.perf_counter() - start:5.0f} s",
            flush=True,
        )
        if reached:
            break
    # The final greedy policy, one whole episode per env from a reset.
    final_eval = greedy_returns(env, qnet, "cartpole")
    print(f"greedy final policy: {final_eval.mean().item():.1f} ({args.num_envs} episodes)")
    result = {
        "task": "masked CartPole-v1",
        "algo": "recurrent DQN",
        "core": args.core,
        "seed": args.seed,
        "frames": frames,
        "stopped_early": frames < args.frames,
        "reached_stop_return": reached,
        "wall_s": time.perf_counter() - start,
        "params": sum(p.numel() for p in core.parameters()),
        "curve": curve,
        "final_eval": final_eval.tolist(),
        "losses": losses,
        "routing": [torch.stack(block).mean(0).tolist() for block in zip(*routing[-5:])],
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    collector.shutdown()
    return {**result, "last_batch": batch}


if __name__ == "__main__":
    main()
