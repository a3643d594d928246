"""Recurrent PPO on a partially observable Pendulum or CartPole, with a MoP, GRU or LSTM core.

    python examples/recurrent_ppo.py --core mop
    python examples/recurrent_ppo.py --core gru --env cartpole --out ppo_gru.json

Pendulum with only the angle observed (``cos θ, sin θ``; the angular velocity is removed by a
TorchRL ``UnaryTransform`` on gymnasium's ``Pendulum-v1``), so the velocity has to be inferred
from memory; ``--env cartpole``: ``CartPole-v1`` observing the cart position and the pole angle
only, as in ``recurrent_dqn.py``. A ``TanhNormal`` (Pendulum) or categorical (CartPole) actor
and a value head share an encoder and the recurrent core; the loss is TorchRL's ``ClipPPOLoss``
on whole per-env sequences (it enters recurrent mode by itself) with advantages from ``GAE``,
which does not: it runs inside ``set_recurrent_mode(True)``. Each task has its own defaults
(``DEFAULTS``, after the recurrent-PPO settings of the RL Baselines3 Zoo for these masked tasks,
with fewer epochs on Pendulum to fit a CPU budget); any flag overrides them.

``GAE(..., deactivate_vmap=True)``: a recurrent critic fails under ``vmap`` in torchrl 0.14 (the
GRU/LSTM modules too). Once ``MoPModule`` is vmappable (issue 13) the MoP core can drop the flag
in ``make_advantage`` below; the baselines keep it. With ``--core mop`` the routing cost of the
loss's own replay is added to the PPO loss in the plain form ``α·cost``
(``routing_cost_loss(..., mode="plain")``; ``--alpha 0`` disables it): the paper's scaled form
``α·cost/(ε + L)`` needs a positive performance measure ``L``, and the PPO total (surrogate +
critic + entropy) is not one (it goes below 0, and below ``-ε``). The default α is
``DEFAULT_RL_ALPHA``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule, TensorDictSequential
from torch import nn
from torch.distributions import Categorical
from torchrl.collectors import Collector
from torchrl.data import Categorical as CategoricalSpec
from torchrl.envs import (
    Compose,
    GymEnv,
    InitTracker,
    RewardScaling,
    RewardSum,
    SerialEnv,
    StepCounter,
    TransformedEnv,
    UnaryTransform,
)
from torchrl.modules import ProbabilisticActor, TanhNormal, set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from mop_torchrl import MoPConfig, routing_cost_loss
from mop_torchrl.babyai.policy import make_core
from mop_torchrl.core.config import DEFAULT_RL_ALPHA

# Parameter counts of the three cores (input 64): MoP 66k, GRU(120) 67k, LSTM(100) 66k.
MOP = MoPConfig.from_preset("paper", input_dim=64, router_dim=16)  # layers "0,16,32" x 3, D=64
BASELINE_HIDDEN = {"mop": 0, "gru": 120, "lstm": 100}


# task: (gymnasium id, observation entries kept)
TASKS = {"pendulum": ("Pendulum-v1", [0, 1]), "cartpole": ("CartPole-v1", [0, 2])}
# Per-task defaults of the flags below (None there); a flag given on the command line wins.
# CartPole follows the RL Zoo's recurrent PPO for CartPoleNoVel (8 envs x 32 steps, one
# minibatch, gamma 0.98, lambda 0.8, lr 1e-3 annealed) with 10 epochs instead of 20; Pendulum
# has 16 envs x 64 steps in 4 minibatches, 5 epochs (the Zoo's PendulumNoVel: 10 epochs of
# 32 minibatches on 4 envs x 1024 steps). Frames sized for a MoP run of about
# 5 minutes on one server core. Dev machine, one core, MoP / GRU ms per frame: CartPole 4.0 / 1.7
# at 20 epochs (so about 2.3 / 1.0 at 10), Pendulum 1.8 / 0.65: updates cost MoP most.
DEFAULTS = {
    "pendulum": {
        "frames": 245_760,
        "num_envs": 16,
        "steps_per_batch": 64,
        "epochs": 5,
        "minibatches": 4,
        "lr": 1e-3,
        "gamma": 0.9,
        "lmbda": 0.95,
    },
    "cartpole": {
        "frames": 204_800,
        "num_envs": 8,
        "steps_per_batch": 32,
        "epochs": 10,
        "minibatches": 1,
        "lr": 1e-3,
        "gamma": 0.98,
        "lmbda": 0.8,
    },
}


def make_env(task: str, num_envs: int, seed: int) -> TransformedEnv:
    """``num_envs`` masked Pendulums (``cos θ, sin θ`` only) or CartPoles (cart position and
    pole angle only); rewards scaled by 0.1 for the critic, ``episode_reward`` unscaled."""
    env_id, kept = TASKS[task]
    env = TransformedEnv(
        SerialEnv(num_envs, lambda: GymEnv(env_id, categorical_action_encoding=True)),
        Compose(
            UnaryTransform(["observation"], ["observation"], fn=lambda obs: obs[..., kept]),
            InitTracker(),
            StepCounter(),
            RewardSum(),
            RewardScaling(loc=0.0, scale=0.1),
        ),
    )
    env.set_seed(seed)
    return env


def make_actor_critic(
    core_kind: str, env: TransformedEnv
) -> tuple[ProbabilisticActor, TensorDictSequential, nn.Module]:
    """``observation → Linear+ReLU → core`` shared by the actor (``TanhNormal`` for continuous
    actions, categorical logits for discrete ones) and a value head."""
    encoder = TensorDictModule(
        nn.Sequential(nn.Linear(2, 64), nn.ReLU()), ["observation"], ["embed"]
    )
    core, width = make_core(core_kind, 64, mop=MOP, gru_hidden_size=BASELINE_HIDDEN[core_kind])
    action_spec = env.action_spec_unbatched
    if isinstance(action_spec, CategoricalSpec):
        policy_head = TensorDictModule(nn.Linear(width, action_spec.n), ["features"], ["logits"])
        dist_keys, dist_class, dist_kwargs = ["logits"], Categorical, {}
    else:
        policy_head = TensorDictModule(
            nn.Sequential(nn.Linear(width, 2 * action_spec.shape[-1]), NormalParamExtractor()),
            ["features"],
            ["loc", "scale"],
        )
        dist_keys, dist_class = ["loc", "scale"], TanhNormal
        dist_kwargs = {"low": action_spec.space.low, "high": action_spec.space.high}
    actor = ProbabilisticActor(
        TensorDictSequential(encoder, core, policy_head),
        in_keys=dist_keys,
        spec=action_spec,
        distribution_class=dist_class,
        distribution_kwargs=dist_kwargs,
        return_log_prob=True,
    )
    critic = TensorDictSequential(
        encoder, core, TensorDictModule(nn.Linear(width, 1), ["features"], ["state_value"])
    )
    return actor, critic, core


def make_advantage(critic: TensorDictSequential, gamma: float, lmbda: float) -> GAE:
    """GAE over whole sequences; ``deactivate_vmap=True`` for recurrent critics (see above)."""
    return GAE(gamma=gamma, lmbda=lmbda, value_network=critic, deactivate_vmap=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--core", choices=["mop", "gru", "lstm"], default="mop")
    parser.add_argument("--env", choices=list(TASKS), default="pendulum")
    # None: the task's value in DEFAULTS
    parser.add_argument("--frames", type=int, help="env steps in total")
    parser.add_argument("--num_envs", type=int)
    parser.add_argument("--steps_per_batch", type=int, help="steps per env per batch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--minibatches", type=int, help="groups of whole env sequences")
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--anneal_lr", action=argparse.BooleanOptionalAction, default=True, help="linearly to 0"
    )
    parser.add_argument("--gamma", type=float)
    parser.add_argument("--lmbda", type=float)
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_RL_ALPHA, help="routing cost weight (plain form)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_wall_s", type=float, default=None, help="stop early (results kept) after this"
    )
    parser.add_argument("--out", help="write the learning curve and routing here (JSON)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.env].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Trains and returns the curve (per finished episode: frames so far, return), the losses,
    the MoP routing of the last batches and the last collected batch."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    # Subnormal activations made the recurrent updates ~4x slower on CPU (measured): flush them.
    torch.set_flush_denormal(True)
    env = make_env(args.env, args.num_envs, args.seed)
    actor, critic, core = make_actor_critic(args.core, env)
    env.append_transform(core.make_tensordict_primer())
    loss_fn = ClipPPOLoss(actor, critic, entropy_coeff=0.0, normalize_advantage=True)
    advantage = make_advantage(critic, args.gamma, args.lmbda)
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
    frames_per_batch = args.num_envs * args.steps_per_batch
    collector = Collector(env, actor, frames_per_batch=frames_per_batch, total_frames=args.frames)

    curve, losses, routing = [], [], []
    frames, start = 0, time.perf_counter()
    for batch in collector:  # [env, time]
        if args.max_wall_s is not None and time.perf_counter() - start > args.max_wall_s:
            break
        frames += batch.numel()
        done = batch["next", "done"].squeeze(-1)
        for env_i, t in done.nonzero().tolist():
            step_frames = frames - frames_per_batch + (t + 1) * args.num_envs
            curve.append((step_frames, batch["next", "episode_reward"][env_i, t].item()))
        if args.core == "mop":
            routing.append(
                [batch["routing", f"block{b}"].mean((0, 1)) for b in range(MOP.num_blocks)]
            )
        if args.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = args.lr * (1 - (frames - frames_per_batch) / args.frames)
        with torch.no_grad(), set_recurrent_mode(True):
            advantage(batch)
        for _ in range(args.epochs):
            for envs in torch.randperm(args.num_envs).chunk(args.minibatches):
                costs.clear()
                out = loss_fn(batch[envs])  # whole sequences per env
                loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
                if costs:
                    cost = torch.cat([c.flatten() for c in costs])
                    loss = routing_cost_loss(loss, cost, args.alpha, mode="plain")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(loss_fn.parameters(), 1.0)
                optimizer.step()
                losses.append(loss.item())
        recent = [r for _, r in curve[-20:]]
        print(
            f"frames {frames:>7}  loss {losses[-1]:.4f}  "
            f"return(last 20) {sum(recent) / max(len(recent), 1):7.1f}  "
            f"{time.perf_counter() - start:5.0f} s",
            flush=True,
        )
    result = {
        "task": f"masked {TASKS[args.env][0]}",
        "algo": "recurrent PPO",
        "core": args.core,
        "seed": args.seed,
        "frames": frames,
        "stopped_early": frames < args.frames,
        "wall_s": time.perf_counter() - start,
        "params": sum(p.numel() for p in core.parameters()),
        "curve": curve,
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
