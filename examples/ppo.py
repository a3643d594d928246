"""PPO on BabyAI with a recurrent MoP actor-critic, in one page.

    python examples/ppo.py --task_id GoToRedBall --num_updates 200

ClipPPOLoss replays each env's unroll in recurrent mode by itself; GAE does not, so it runs
inside ``set_recurrent_mode(True)``. Episode ends are treated as terminal, as BabyAI's own PPO does. The packaged
version is ``mop-torchrl train --algo ppo``.
"""

import argparse

import torch
from torchrl.collectors import Collector
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE
from tqdm import tqdm

from mop_torchrl import MoPConfig
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.policy import make_policy

parser = argparse.ArgumentParser()
parser.add_argument("--task_id", "--level", default="GoToRedBall", help="BabyAI level")
parser.add_argument("--num_envs", type=int, default=16)
parser.add_argument("--unroll_len", type=int, default=32)
parser.add_argument("--num_updates", type=int, default=200)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--minibatches", type=int, default=4)
parser.add_argument("--lr", type=float, default=3e-4)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

actor, critic = make_policy("mop", mop=MoPConfig.from_preset("paper"))
loss_module = ClipPPOLoss(actor, critic, entropy_coeff=0.01, normalize_advantage=True)
advantage = GAE(gamma=0.99, lmbda=0.95, value_network=critic, shifted=True)
optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.lr)
env = make_babyai_env(args.task_id, num_envs=args.num_envs, seed=args.seed, parallel=False)
frames = args.num_envs * args.unroll_len
collector = Collector(
    env,
    actor.eval(),
    frames_per_batch=frames,
    total_frames=frames * args.num_updates,
    auto_register_policy_transforms=True,
)

returns = []
bar = tqdm(collector, total=args.num_updates)
for data in bar:
    data = data.reshape(args.num_envs, args.unroll_len)
    done = data["next", "done"]
    returns += data["next", "episode_reward"][done].tolist()
    data["next", "terminated"] = done.clone()  # time-outs count as terminal (BabyAI's PPO)
    with torch.no_grad(), set_recurrent_mode(True):
        advantage(data)

    actor.train()
    for _ in range(args.epochs):
        for envs in torch.randperm(args.num_envs).chunk(args.minibatches):
            losses = loss_module(data[envs])  # whole sequences per env
            loss = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(loss_module.parameters(), 1.0)
            optimizer.step()
    actor.eval()
    recent = sum(returns[-100:]) / max(len(returns[-100:]), 1)
    bar.set_postfix(loss=f"{loss.item():.3f}", mean_return=f"{recent:.3f}")
collector.shutdown()
