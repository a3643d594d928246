"""Online imitation (DAgger-style) of the BabyAI bot with a MoP policy, in one page.

    python examples/imitation.py --task_id GoToRedBall --num_updates 100

The student acts greedily; the bot, running inside each env, labels every step with
``expert_action``; each update replays the unroll in recurrent mode from the stored hidden
states and minimises cross-entropy to the labels plus the routing cost. The packaged version
with logging, checkpoints and resume is ``mop-torchrl train --algo imitation``.
"""

import argparse

import torch
import torch.nn.functional as F
from tensordict.nn import InteractionType
from torchrl.collectors import Collector
from torchrl.modules import set_recurrent_mode
from tqdm import tqdm

from mop_torchrl import MoPConfig, routing_cost_loss
from mop_torchrl.babyai.envs import make_babyai_env
from mop_torchrl.babyai.policy import make_policy, policy_parts
from mop_torchrl.core.config import DEFAULT_ALPHA

parser = argparse.ArgumentParser()
parser.add_argument("--task_id", "--level", default="GoToRedBall", help="BabyAI level")
parser.add_argument("--num_envs", type=int, default=16)
parser.add_argument("--unroll_len", type=int, default=32)
parser.add_argument("--num_updates", type=int, default=100)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="routing cost weight")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
torch.set_num_threads(1)

mop = MoPConfig.from_preset("seed")
actor, _ = make_policy("mop", mop=mop)
logits_module = policy_parts(actor).logits  # encoder -> MoP core -> logits (no sampling)
optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr)
env = make_babyai_env(
    args.task_id, num_envs=args.num_envs, seed=args.seed, expert=True, parallel=False
)
frames = args.num_envs * args.unroll_len
collector = Collector(
    env,
    actor.eval(),
    frames_per_batch=frames,
    total_frames=frames * args.num_updates,
    exploration_type=InteractionType.DETERMINISTIC,  # the student acts greedily
    auto_register_policy_transforms=True,  # registers the MoP hidden-state primer
)

successes = []
bar = tqdm(collector, total=args.num_updates)
for data in bar:
    data = data.reshape(args.num_envs, args.unroll_len)
    done = data["next", "done"].squeeze(-1)
    successes += data["next", "success"][done].float().tolist()

    actor.train()
    with set_recurrent_mode(True):  # truncated BPTT from the stored hidden states
        out = logits_module(data.copy())
    labels = data["expert_action"]
    valid = labels >= 0  # -1: the bot failed to plan for this step
    task_loss = F.cross_entropy(out["logits"][valid], labels[valid])
    loss = routing_cost_loss(task_loss, out["routing", "cost"], args.alpha)
    # (the package's loop uses mop_torchrl.train.losses.ImitationLoss: these lines as a LossModule)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
    optimizer.step()
    actor.eval()

    accuracy = (out["logits"].argmax(-1) == labels)[valid].float().mean().item()
    recent = sum(successes[-100:]) / max(len(successes[-100:]), 1)
    bar.set_postfix(loss=f"{task_loss.item():.3f}", acc=f"{accuracy:.2f}", success=f"{recent:.2f}")
collector.shutdown()
