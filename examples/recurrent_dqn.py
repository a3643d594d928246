"""Recurrent DQN on a partially observable CartPole, with a MoP, GRU or LSTM core.

    python examples/recurrent_dqn.py --core mop --frames 150000
    python examples/recurrent_dqn.py --core lstm --frames 150000 --out dqn_lstm.json

The shape of TorchRL's recurrent-DQN tutorial (``tutorials/sphinx-tutorials/dqn_with_rnn.py``):
the core's ``TensorDictPrimer`` on the env, a ``QValueModule`` behind the core, ``EGreedyModule``
exploration, a replay buffer sampled as slices by ``SliceSampler``, ``DQNLoss`` with a target
network kept by ``SoftUpdate``. Swapping the core is the only difference between the three runs.

The environment is CartPole with the velocities removed from the observation (only the cart
position and the pole angle are seen), so the policy has to remember: a TorchRL
``UnaryTransform`` keeps observation entries 0 and 2 of gymnasium's ``CartPole-v1``.

``DQNLoss`` enters recurrent mode by itself: each sampled slice is replayed from the hidden state
stored when it was collected. With ``--core mop`` the routing cost of that replay is added to the
TD loss in the plain form ``α·cost`` (``routing_cost_loss(..., mode="plain")``, α from
``DEFAULT_RL_ALPHA``; ``--alpha 0`` disables it): the TD error is positive, but it measures how
well the values are predicted, not how well the task is done (it can grow as the agent
improves), so it is no denominator for the paper's performance-scaled form.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.data.replay_buffers.samplers import SliceSampler
from torchrl.envs import (
    Compose,
    GymEnv,
    InitTracker,
    RewardSum,
    SerialEnv,
    StepCounter,
    TransformedEnv,
    UnaryTransform,
)
from torchrl.modules import EGreedyModule, QValueModule
from torchrl.objectives import DQNLoss, SoftUpdate

from mop_torchrl import MoPConfig, routing_cost_loss
from mop_torchrl.babyai.policy import make_core
from mop_torchrl.core.config import DEFAULT_RL_ALPHA

# Parameter counts of the three cores (input 64): MoP 66k, GRU(120) 67k, LSTM(100) 66k.
MOP = MoPConfig.from_preset("paper", input_dim=64, router_dim=16)  # layers "0,16,32" x 3, D=64
BASELINE_HIDDEN = {"mop": 0, "gru": 120, "lstm": 100}


def make_env(num_envs: int, seed: int) -> TransformedEnv:
    """``num_envs`` CartPoles that observe only the cart position and the pole angle."""
    env = TransformedEnv(
        SerialEnv(num_envs, lambda: GymEnv("CartPole-v1", categorical_action_encoding=True)),
        Compose(
            UnaryTransform(["observation"], ["observation"], fn=lambda obs: obs[..., [0, 2]]),
            InitTracker(),
            StepCounter(),
            RewardSum(),
        ),
    )
    env.set_seed(seed)
    return env


def make_qnet(core_kind: str, env: TransformedEnv) -> tuple[TensorDictSequential, nn.Module]:
    """``observation → Linear+ReLU → core → MLP → QValueModule``, and the core."""
    encoder = TensorDictModule(
        nn.Sequential(nn.Linear(2, 64), nn.ReLU()), ["observation"], ["embed"]
    )
    core, width = make_core(core_kind, 64, mop=MOP, gru_hidden_size=BASELINE_HIDDEN[core_kind])
    head = TensorDictModule(
        nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 2)),
        ["features"],
        ["action_value"],
    )
    qvalue = QValueModule(spec=env.action_spec_unbatched)
    return TensorDictSequential(encoder, core, head, qvalue), core


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--core", choices=["mop", "gru", "lstm"], default="mop")
    parser.add_argument("--frames", type=int, default=150_000, help="env steps in total")
    parser.add_argument("--num_envs", type=int, default=8)
    parser.add_argument("--steps_per_batch", type=int, default=16, help="steps per env per batch")
    parser.add_argument("--updates_per_batch", type=int, default=1)
    parser.add_argument("--slice_len", type=int, default=16)
    parser.add_argument("--slices", type=int, default=16, help="slices per update")
    parser.add_argument("--buffer_size", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=2_000, help="frames before learning")
    parser.add_argument("--eps_frames", type=int, default=10_000, help="ε annealing (1 → 0.01)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--tau", type=float, default=0.01, help="target network soft update")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_RL_ALPHA, help="routing cost weight (plain form)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_wall_s", type=float, default=None, help="stop early (results kept) after this"
    )
    parser.add_argument("--out", help="write the learning curve and routing here (JSON)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Trains and returns the curve (per finished episode: frames so far, return), the losses,
    the MoP routing of the last batches and the last collected batch."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    # Subnormal activations made the recurrent updates ~4x slower on CPU (measured): flush them.
    torch.set_flush_denormal(True)
    env = make_env(args.num_envs, args.seed)
    policy, core = make_qnet(args.core, env)
    env.append_transform(core.make_tensordict_primer())
    explore = EGreedyModule(
        env.action_spec, eps_init=1.0, eps_end=0.01, annealing_num_steps=args.eps_frames
    )
    actor = TensorDictSequential(policy, explore)
    loss_fn = DQNLoss(policy, action_space=env.action_spec_unbatched, delay_value=True)
    loss_fn.make_value_estimator(gamma=args.gamma)
    target_update = SoftUpdate(loss_fn, tau=args.tau)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=args.lr)
    # The routing cost of the loss's own (differentiable) replay, captured from the core.
    costs: list[torch.Tensor] = []
    if args.core == "mop":
        core.register_forward_hook(
            lambda _m, _i, out: (
                costs.append(out["routing", "cost"])
                if out["routing", "cost"].requires_grad
                else None
            )
        )
    # A 2-D storage keeps each env's steps in order: slices never cross from one env to another.
    buffer = TensorDictReplayBuffer(
        storage=LazyTensorStorage(args.buffer_size, ndim=2),
        sampler=SliceSampler(
            slice_len=args.slice_len, end_key=("next", "done"), strict_length=True
        ),
        batch_size=args.slice_len * args.slices,
    )

    frames_per_batch = args.num_envs * args.steps_per_batch
    collector = Collector(env, actor, frames_per_batch=frames_per_batch, total_frames=args.frames)

    curve, losses, routing = [], [], []
    frames, start = 0, time.perf_counter()
    for batch in collector:  # [env, time]
        if args.max_wall_s is not None and time.perf_counter() - start > args.max_wall_s:
            break
        frames += batch.numel()
        explore.step(batch.numel())
        buffer.extend(batch)
        done = batch["next", "done"].squeeze(-1)
        for env_i, t in done.nonzero().tolist():
            step_frames = frames - frames_per_batch + (t + 1) * args.num_envs
            curve.append((step_frames, batch["next", "episode_reward"][env_i, t].item()))
        if args.core == "mop":
            routing.append(
                [batch["routing", f"block{b}"].mean((0, 1)) for b in range(MOP.num_blocks)]
            )
        if frames < args.warmup:
            continue
        for _ in range(args.updates_per_batch):
            costs.clear()
            # [slices, time]: each row starts from its stored state (a flat sample would be
            # replayed as one long sequence crossing the slice boundaries).
            sample = buffer.sample().reshape(args.slices, args.slice_len)
            loss = loss_fn(sample)["loss"]
            if costs:
                cost = torch.cat([c.flatten() for c in costs])
                loss = routing_cost_loss(loss, cost, args.alpha, mode="plain")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(loss_fn.parameters(), 10.0)
            optimizer.step()
            target_update.step()
            losses.append(loss.item())
        if len(losses) % 500 < args.updates_per_batch:
            recent = [r for _, r in curve[-100:]]
            print(
                f"frames {frames:>7}  loss {losses[-1]:.4f}  "
                f"return(last 100) {sum(recent) / max(len(recent), 1):6.1f}  "
                f"{time.perf_counter() - start:5.0f} s",
                flush=True,
            )
    result = {
        "task": "masked CartPole",
        "algo": "recurrent DQN",
        "core": args.core,
        "seed": args.seed,
        "frames": frames,
        "stopped_early": frames < args.frames,
        "wall_s": time.perf_counter() - start,
        "params": sum(p.numel() for p in core.parameters()),
        "curve": curve,
        "losses": losses,
        "routing": [torch.stack(block).mean(0).tolist() for block in zip(*routing[-20:])],
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    collector.shutdown()
    return {**result, "last_batch": batch}


if __name__ == "__main__":
    main()
