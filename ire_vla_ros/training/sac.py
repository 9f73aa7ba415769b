"""Stage 1 as SAC from demonstrations (SACfD) on cached frozen-VLM latents.

The iRe-VLA paper's real-robot Stage 1 (SERL set-up): the VLM is frozen, every frame goes through it
once, and RL runs on the stored latents. Batches are drawn half from a demo buffer (teleop episodes)
and half from an online buffer (the policy's own transitions), as RLPD / SERL / HIL-SERL do.

- Actor: the policy's own token-learner + MLP head as a tanh-squashed Gaussian
  (`VLAPolicy.squashed_sample`, `action_squash="tanh"`; see `vla/policy.py` for how Stage 2's MSE
  relates to it). A Stage 0 head trained with the "clip" mapping is first distilled onto the tanh
  mapping (`distill_to_tanh`) so SAC starts from the Stage 0 behaviour.
- Critic: a fresh token learner over the same latents (initialised from the actor's pooling by
  default, a measured choice: see README) feeding an ensemble of LayerNorm MLPs with one output
  layer per member (2 by default, as HIL-SERL; 10 as RLPD/SERL is `num_critics: 10`); the TD
  target is the min over 2 random members, the actor maximises the ensemble mean.
- Sparse reward (1 on success; the episode ends on success) by default. Terminal mask: only a
  success ends the bootstrap; a time-limit truncation is *not* done (hil-serl#49).
- What made it learn at this scale (sacfd-facts.md: a fresh critic + plain SAC collapsed the
  policy): critic pre-training on the demos with the TD target floored by the Monte-Carlo return
  (Cal-QL's calibration), and a behaviour regulariser in the actor loss (MSE to the demo action on
  the demo half, to the collecting policy's action on the online half), TD3+BC style, annealed.

Each loss is one function (`critic_loss`, `actor_loss` / `awac_actor_loss`, `temperature_loss`),
like LeRobot's modeling_sac.py; `SACLearner` holds the networks and optimizers and runs updates.

Where the wall clock goes (button-press-topdown-v3, tiny preset, one torch thread, load ~2-3 on 2
cores; bench_stage1_sparse.py, 1024 decisions): updates ~58 % (0.14 s per update with 10 members,
the actor every 2nd), collection 8 ms per decision (env step + MuJoCo render ~6.3 ms of it, the
batched backbone ~1.2 ms), 40 held-out episodes ~20 s (rendering-bound). Update-step cost, same
process and load (critic step / extra for the actor step, batch 256):
- as first written, 10 members: 105 / 71 ms -> 7.1 updates/s;
- vectorized (the shared input in one GEMM for all members, the TD target runs only its 2
  sampled members, no critic weight gradients in the actor loss, trailing padding tokens
  trimmed): 82 / 54 ms -> 9.2 updates/s;
- the same with 2 members (HIL-SERL): 46 / 30 ms -> 16.3 updates/s. The token learners (critic,
  target, actor over the latent and next latent) are then most of an update.
With 2 members and utd 1 (8192 updates in 12 min) held-out success went 0.42 -> 0.50 -> 0.53 at
0/4k/8k decisions; 10 members at utd 0.5 (4096 updates in 13.5 min): 0.42 -> 0.55 -> 0.45. Hence
the defaults `num_critics: 2`, `utd: 1`. Tried from there (same Stage 0, 40 held-out episodes, +-0.08):
`actor_objective: awac` 0.42 -> 0.50 -> 0.38; `target_entropy: -4` (SAC's -|A|) 0.42 -> 0.50 -> 0.47:
neither kept. In every run the stochastic training success fell in the second half (0.5 -> 0.35)
while `bc_weight` annealed to its floor. Session 7 separated the suspects (same Stage 0, 8192
decisions; `stage1_sparse_tuning_button_press_*.json`): no anneal (`bc_weight_final: 0.4`) 0.42 ->
0.50 -> 0.50, training success still fell (0.53 -> 0.38): not the anneal. What rises in every
button-press run is the temperature (0.011 -> 0.019): the demo actions saturate tanh, so the
squashed entropy stays under its target whatever the noise, and alpha climbs (on button-press; it
falls on the other two tasks). Bounding the noise (`max_log_std`) leaves alpha free to climb
further: -0.5 gave 0.42 -> 0.50 -> 0.53 (alpha 0.019), -1.0 collapsed to 0.25 at 8k (alpha 0.027;
training success 0.62 at 5k, then 0.35), and a fixed temperature (`lr_temperature: 0`, alpha 0.01)
gave 0.42 -> 0.47 -> 0.45 with the same dip in training success (0.53 -> 0.38 -> 0.45): neither the
anneal, the noise nor the temperature alone explains it. The critic's mean Q falls with the training
success in every run (0.69 -> 0.54). drawer-open at 16,384 decisions: 0.38 -> 0.53 (its training
success rose to 0.55 late); at 24,576 it peaked at 16k (0.53) and ended at 0.45. Session 8 (button-press,
8192 decisions, held-out 4k / 8k): noise and temperature both fixed 0.50 / 0.23; the actor's pooling
frozen (`actor_train_pool: false`) 0.50 / 0.50; no self-imitation on online rows (`online_bc: none`)
0.50 / 0.23; the critic's pooling frozen (`critic_train_pool: false`) 0.40 / 0.53: the training-success
fall after ~4-5k decisions survives every one, and Stage 2 (demos + successes) lands at 0.50-0.55
after each, whatever Stage 1 ended at. The GPU (or a real VLM's encoder cost)
changes the time balance.

Session 10 found those sessions' policy blind to its camera (vla/backbone.py); session 11, with a
policy that sees (20 demos, Stage 0 0.82-0.93 held-out), found why the exploring success falls:
the exploration noise drifts up at Adam's full step. Unbounded, log std went -0.93 -> +0.04 /
-0.20 / -0.22 (button-press / plate-slide / drawer-open) over 8,192 decisions (4,096 actor
updates x lr 3e-4 = 1.2 at most), while the temperature rose on one task and fell on the others:
not the temperature. The expert's actions sit at the box bounds (pre-squash ~3, where tanh' is
~0.01), so the actor's Q term hardly changes with the noise there and nothing holds back the
entropy term (test_sac.py: near a bound the Q term's gradient on log std is ~1/170 of its value at
a centred mean). Hence `max_log_std` defaults to the initial noise. Measured with the bound:
see the README's bench row (stage1_sparse_bounded.json).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from . import tb

from ..vla.heads import TokenLearner
from ..vla.policy import VLAPolicy

log = logging.getLogger(__name__)


@dataclass
class SACConfig:
    """SACfD hyperparameters. Sourced defaults: ../shared/notes/sacfd-facts.md (RLPD/SERL/HIL-SERL)."""

    total_env_steps: int = 16_384  # policy decisions in simulation (all envs together)
    num_envs: int = 8
    batch_size: int = 256
    demo_fraction: float = 0.5  # share of each batch drawn from the demo buffer
    buffer_bytes: int = 2 << 30  # online buffer capacity in bytes (fp16 latents), see bytes_per_transition
    demo_buffer_bytes: int = 2 << 30
    # HIL-SERL / LeRobot: 2 (RLPD / SERL: 10). Measured here: 2.3x the updates per second of 10 (the
    # ensemble was half of an update), no worse held-out success at the same wall clock (docstring).
    num_critics: int = 2
    target_critics: int = 2  # TD target: min over this many random members (with 2: clipped double Q)
    critic_hidden: int = 256
    # DroQ (Hiraoka et al. 2022): dropout before each hidden LayerNorm of every member, 0.01 there; a
    # regulariser for a critic fitted to few episodes. 0: none (SERL / HIL-SERL).
    critic_dropout: float = 0.0
    critic_pool_init: str = "actor"  # "actor": start the critic's token learner from the actor's; "random"
    # False: the critic's token learner stays as initialised (with "actor": Stage 0's pooling, fitted
    # with augmentation) and only its ensemble MLPs train: fewer weights to fit to a few hundred episodes.
    critic_train_pool: bool = True
    lr_actor: float = 3e-4
    # False: Stage 1 trains the actor's MLP and noise only; its token learner (the pooling of the
    # frozen latents, fitted with augmentation in Stage 0) stays as Stage 0 left it.
    actor_train_pool: bool = True
    lr_critic: float = 3e-4
    lr_temperature: float = 3e-4
    init_temperature: float = 0.01  # SERL / HIL-SERL
    target_entropy: float | None = None  # None: -|A| / 2
    backup_entropy: bool = False  # entropy term in the TD target (SERL: no)
    tau: float = 0.005
    gamma: float = 0.97
    utd: float = 1.0  # critic updates per collected transition
    critic_actor_ratio: int = 2  # critic updates per actor update (HIL-SERL: 2)
    grad_clip: float = 10.0
    learning_starts: int = 0  # online transitions before updates start (the demo buffer is full already)
    # Online transitions before the actor's first update; the critic trains from the start. A critic
    # fitted to the demos alone has seen no failure, so its action gradient says little at first.
    # Not benchmarked yet (session 11): from 5 demos SACfD still first loses points before gaining.
    actor_learning_starts: int = 0
    init_log_std: float = -1.0  # exploration noise (pre-squash units) at the start of Stage 1
    # Upper bound on that noise (None: only the head's own clamp at 1.0), by default the initial noise:
    # near the action bounds only the entropy term moves it, upward (module docstring, session 11).
    # Also a safety bound on how far a real arm may wander while exploring.
    max_log_std: float | None = -1.0
    # The online learner publishes a Polyak average of the actor (avg += tau * (actor - avg) after each
    # actor update) instead of the actor as trained; 0: the actor as trained. Why: measured online,
    # successive heads' held-out success swung 0.10 <-> 0.55 within 5 minutes (README).
    head_average_tau: float = 0.0
    # Making it learn on small data (see module docstring):
    distill_steps: int = 300  # clip head -> tanh head, on the demo latents (0 if the head is tanh already)
    critic_pretrain_steps: int = 1000  # critic-only updates on the demo buffer before any rollout
    mc_lower_bound: bool = True  # floor TD targets with the Monte-Carlo return where it is known (Cal-QL)
    bc_weight: float = 0.4  # behaviour regulariser weight (TD3+BC's alpha = 2.5 -> 1/2.5)
    # What the regulariser pulls online rows toward: "success": the executed action of transitions
    # from successful episodes (self-imitation; other online rows free); "behaviour": the collecting
    # policy's deterministic action (a trust region); "none": demo rows only.
    online_bc: str = "success"
    # Actor objective: "sac" (reparameterised: alpha * log pi - Q, plus the regulariser) or "awac"
    # (advantage-weighted regression onto the buffer's own actions, weights exp(A / awac_beta)
    # capped at awac_max_weight, A = Q(s, a) - Q(s, a ~ pi); exploration noise stays fixed). AWAC
    # cannot chase the critic's errors off the data, the failure seen with "sac" here (README).
    actor_objective: str = "sac"
    awac_beta: float = 0.1
    awac_max_weight: float = 20.0
    bc_weight_final: float = 0.1  # annealed linearly to this over bc_anneal_updates actor updates
    bc_anneal_updates: int = 4000
    normalize_actor_q: bool = True  # divide the actor's Q term by mean |Q| (TD3+BC)
    reward: str = "sparse"  # "sparse": 1 on success (the paper); "dense": Metaworld's shaped reward
    dense_reward_scale: float = 0.1
    keep_successful: bool = True  # write successful episodes to the store for Stage 2
    offline_updates: int = 3000  # `train offline`: gradient steps over demos + all policy episodes
    seed: int = 0

    def resolved_target_entropy(self, action_dim: int) -> float:
        return float(self.target_entropy) if self.target_entropy is not None else -action_dim / 2.0


# ============================================================================ latent replay
def bytes_per_transition(tokens: int, width: int, state_dim: int, action_dim: int) -> int:
    """Bytes one stored transition takes in `LatentReplay`.

    latent + next latent (fp16, tokens x width each), their masks (bool), state + next state,
    action, the behaviour policy's deterministic action, reward, done, Monte-Carlo return, episode
    success (fp32).
    E.g. (see test_sac.py):
    - tiny preset (8 query + 16 text tokens, d=64, 9 joints, 4-D action): 6,312 B;
    - BLIP-2 OPT-2.7B-sized latent (32 query + 16 text tokens, d=2560, 7 joints, 7-D action):
      491,744 B (~480 KiB), so 1 GiB holds 2,183 transitions and 20 demos x 50 steps take ~0.5 GB.
    """
    latent = 2 * (tokens * width * 2 + tokens)  # fp16 hidden + bool mask, obs and next obs
    return latent + 4 * (2 * state_dim + 2 * action_dim + 4)


class StaleLatents(RuntimeError):
    """Latents from another backbone (checkpoint/LoRA) than the buffer holds: recompute them."""


def backbone_tag(policy: VLAPolicy) -> str:
    """A hash of what the latents depend on: backbone config and LoRA weights (base VLM is fixed)."""
    h = hashlib.sha256(json.dumps(policy.cfg.backbone.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted((n, p) for n, p in policy.backbone.named_parameters() if "lora_" in n):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentReplay:
    """Ring buffer of transitions in latent space; capacity given in bytes.

    Latents are stored in fp16 (what the frozen backbone produced, halved), tagged with the backbone
    they came from: adding latents of another tag raises `StaleLatents` (after Stage 2 changes
    LoRA, the owner clears the buffer and re-encodes its episode files).
    """

    def __init__(self, capacity_bytes: int, tokens: int, width: int, state_dim: int, action_dim: int, tag: str):
        self.bytes_per_transition = bytes_per_transition(tokens, width, state_dim, action_dim)
        self.capacity = int(capacity_bytes // self.bytes_per_transition)
        if self.capacity < 1:
            raise ValueError(f"buffer of {capacity_bytes} B holds no transition of {self.bytes_per_transition} B")
        C = self.capacity
        self.tokens, self.width, self.tag = tokens, width, tag
        # empty, not zeros: pages of a large buffer become resident only as transitions arrive.
        self.hidden = torch.empty(C, tokens, width, dtype=torch.float16)
        self.next_hidden = torch.empty(C, tokens, width, dtype=torch.float16)
        self.mask = torch.zeros(C, tokens, dtype=torch.bool)
        self.next_mask = torch.zeros(C, tokens, dtype=torch.bool)
        self.state = torch.zeros(C, state_dim)
        self.next_state = torch.zeros(C, state_dim)
        self.action = torch.zeros(C, action_dim)
        self.behaviour_action = torch.zeros(C, action_dim)  # deterministic action of the collecting policy
        self.reward = torch.zeros(C)
        self.done = torch.zeros(C)
        self.mc_return = torch.zeros(C)  # Monte-Carlo return-to-go; -inf until the episode has ended
        self.success = torch.zeros(C)  # 1 where the transition belongs to a successful episode
        self.size = 0
        self.pos = 0
        self.added = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.hidden, self.next_hidden, self.mask, self.next_mask, self.state, self.next_state,
            self.action, self.behaviour_action, self.reward, self.done, self.mc_return, self.success))

    def __len__(self) -> int:
        return self.size

    def _fit(self, h: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if h.shape[1] > self.tokens or h.shape[2] != self.width:
            raise ValueError(f"latent of shape {tuple(h.shape[1:])} does not fit the buffer's ({self.tokens}, {self.width})")
        pad = self.tokens - h.shape[1]
        if pad:
            h = nn.functional.pad(h, (0, 0, 0, pad))
            m = nn.functional.pad(m, (0, pad))
        return h, m

    def add(self, *, hidden, mask, state, action, reward, done, next_hidden, next_mask, next_state,
            behaviour_action, mc_return=None, success=None, tag: str) -> torch.Tensor:
        """Adds a batch of B transitions (tensors with a leading batch dimension); returns their slots."""
        if tag != self.tag:
            raise StaleLatents(f"latents tagged {tag}, buffer holds {self.tag}: clear and re-encode")
        hidden, mask = self._fit(hidden.detach(), mask.detach().bool())
        next_hidden, next_mask = self._fit(next_hidden.detach(), next_mask.detach().bool())
        B = hidden.shape[0]
        if B > self.capacity:
            raise ValueError(f"batch of {B} transitions exceeds the buffer capacity {self.capacity}")
        idx = (self.pos + torch.arange(B)) % self.capacity
        self.hidden[idx] = hidden.to("cpu", torch.float16)
        self.next_hidden[idx] = next_hidden.to("cpu", torch.float16)
        self.mask[idx] = mask.cpu()
        self.next_mask[idx] = next_mask.cpu()
        self.state[idx] = torch.as_tensor(state, dtype=torch.float32).cpu()
        self.next_state[idx] = torch.as_tensor(next_state, dtype=torch.float32).cpu()
        self.action[idx] = torch.as_tensor(action, dtype=torch.float32).cpu()
        self.behaviour_action[idx] = torch.as_tensor(behaviour_action, dtype=torch.float32).cpu()
        self.reward[idx] = torch.as_tensor(reward, dtype=torch.float32).cpu()
        self.done[idx] = torch.as_tensor(done, dtype=torch.float32).cpu()
        mc = torch.full((B,), -math.inf) if mc_return is None else torch.as_tensor(mc_return, dtype=torch.float32)
        self.mc_return[idx] = mc.cpu()
        self.success[idx] = 0.0 if success is None else torch.as_tensor(success, dtype=torch.float32).cpu()
        self.pos = (self.pos + B) % self.capacity
        self.size = min(self.size + B, self.capacity)
        self.added += B
        return idx

    def finish_episode(self, slots: list[int], added_at: int, rewards, success: bool, gamma: float) -> bool:
        """Writes the Monte-Carlo returns and the success flag of an episode that just ended.

        `slots` are the episode's transitions in order, `added_at` the `added` count before its
        first one; False (nothing written) if the ring has overwritten any of them since.
        """
        if self.added - added_at > self.capacity:
            return False
        idx = torch.as_tensor(slots, dtype=torch.long)
        self.mc_return[idx] = torch.as_tensor(discounted_returns(np.asarray(rewards, np.float32), gamma))
        self.success[idx] = float(success)
        return True

    def clear(self, tag: str) -> None:
        self.size = self.pos = 0
        self.tag = tag

    def sample(self, n: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=gen)
        out = {"hidden": self.hidden[idx].float(), "next_hidden": self.next_hidden[idx].float(),
               "mask": self.mask[idx], "next_mask": self.next_mask[idx], "state": self.state[idx],
               "next_state": self.next_state[idx], "action": self.action[idx],
               "behaviour_action": self.behaviour_action[idx], "reward": self.reward[idx],
               "done": self.done[idx], "mc_return": self.mc_return[idx], "success": self.success[idx]}
        return {k: v.to(device) for k, v in out.items()}


def sample_mixed(online: LatentReplay | None, demo: LatentReplay | None, batch_size: int, demo_fraction: float,
                 gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """One batch: `demo_fraction` of it from the demo buffer, the rest online (RLPD's 50/50)."""
    n_demo = int(round(batch_size * demo_fraction)) if demo is not None and len(demo) else 0
    if online is None or len(online) == 0:
        n_demo = batch_size
    parts, flags = [], []
    if n_demo:
        parts.append(demo.sample(n_demo, gen, device))
        flags.append(torch.ones(n_demo, dtype=torch.bool))
    if batch_size - n_demo:
        parts.append(online.sample(batch_size - n_demo, gen, device))
        flags.append(torch.zeros(batch_size - n_demo, dtype=torch.bool))
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    batch["is_demo"] = torch.cat(flags).to(device)
    return trim_padding(batch)


def trim_padding(batch: dict) -> dict:
    """Drops the trailing token positions that are padding in every row (latent and next latent).

    The buffer holds latents padded to its token count (the tiny preset's instruction fills 15 of 24
    positions); attention gives padded keys zero weight and the token learner's projections are per
    token, so the pooled features are the same without them, at ~1/3 less of the pooling's cost,
    which dominates an update once the ensemble is small (measured: README / sac.py docstring).
    """
    used = (batch["mask"] | batch["next_mask"]).any(0).nonzero()
    n = int(used.max()) + 1 if len(used) else 1
    if n < batch["mask"].shape[1]:
        for k in ("hidden", "next_hidden", "mask", "next_mask"):
            batch[k] = batch[k][:, :n]
    return batch


def episode_rewards(rewards: np.ndarray, success: bool, cfg: SACConfig) -> np.ndarray:
    """Per-step reward of a recorded episode under the configured reward."""
    T = len(rewards)
    if cfg.reward == "sparse":
        r = np.zeros(T, np.float32)
    elif cfg.reward == "dense":
        r = np.asarray(rewards, np.float32) * cfg.dense_reward_scale
    else:
        raise ValueError(f"sac.reward must be 'sparse' or 'dense', got {cfg.reward!r}")
    if success:
        r[-1] = 1.0 if cfg.reward == "sparse" else 10.0 * cfg.dense_reward_scale / (1.0 - cfg.gamma)
    return r


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out = np.zeros(len(rewards), np.float32)
    g = 0.0
    for t in reversed(range(len(rewards))):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


@torch.no_grad()
def add_episode(replay: LatentReplay, policy: VLAPolicy, episode, cfg: SACConfig, tag: str, batch_size: int = 64) -> int:
    """Encodes a recorded episode once with the frozen backbone and adds its transitions.

    Episodes end on success (terminal: done=1, no bootstrap) or at a time limit / operator stop
    (not terminal; the last step has no recorded next frame, so it is dropped rather than
    wrongly marked done). Returns the number of transitions added.
    """
    T = episode.n_steps
    images = episode.images["main"] if "main" in episode.images else next(iter(episode.images.values()))
    hs, ms = [], []
    for s in range(0, T, batch_size):
        h, m = policy.encode(images[s:s + batch_size], [episode.instruction] * len(images[s:s + batch_size]))
        hs.append(h.to(torch.float16))
        ms.append(m.bool())
    width = max(h.shape[1] for h in hs)
    hidden = torch.cat([nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h in hs]).cpu()
    mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in ms]).cpu()
    states = policy.normalize_state(episode.joint_positions)
    behaviour = torch.cat([policy.deterministic_action(policy.actor(hidden[s:s + batch_size].float().to(policy.device),
                                                                    mask[s:s + batch_size].to(policy.device),
                                                                    states[s:s + batch_size]))
                           for s in range(0, T, batch_size)]).cpu()
    states = states.cpu()
    actions = policy.normalize_action(episode.actions).cpu()
    rewards = episode_rewards(episode.rewards, episode.success, cfg)
    mc = discounted_returns(rewards, cfg.gamma)
    n = T if episode.success else T - 1
    if n <= 0:
        return 0
    nxt = torch.clamp(torch.arange(n) + 1, max=T - 1)
    done = torch.zeros(n)
    if episode.success:
        done[-1] = 1.0
    # A failed/truncated episode's return-to-go is only known up to the cut: still a lower bound
    # on the true return (rewards are >= 0), which is all the MC floor needs.
    for s in range(0, n, replay.capacity):
        sl = slice(s, min(n, s + replay.capacity))
        replay.add(hidden=hidden[sl], mask=mask[sl], state=states[sl], action=actions[sl],
                   reward=torch.as_tensor(rewards[:n][sl]), done=done[sl], next_hidden=hidden[nxt[sl]],
                   next_mask=mask[nxt[sl]], next_state=states[nxt[sl]], behaviour_action=behaviour[sl],
                   mc_return=torch.as_tensor(mc[:n][sl]), success=torch.full((sl.stop - sl.start,), float(episode.success)),
                   tag=tag)
    return n


# ============================================================================ critic ensemble
class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, B, in) -> (E, B, out).

    A (B, in) input (the same for every member: the critic's first layer) is multiplied with all
    members' weights in one (B, in) x (in, E * out) GEMM, instead of expanding it E times for a
    batched matmul. `members` (indices) runs a subset only: the TD target needs 2 of the 10.
    """

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        if x.dim() == 2:
            E, i, o = w.shape
            y = x @ w.transpose(0, 1).reshape(i, E * o)  # (B, E * out), member-major columns
            return y.view(x.shape[0], E, o).transpose(0, 1) + b
        return torch.baddbmm(b, x, w)


class EnsembleLayerNorm(nn.Module):
    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return torch.addcmul(b, nn.functional.layer_norm(x, x.shape[-1:]), w)


class CriticEnsemble(nn.Module):
    """Q(latent, proprio, action): the head's token-learner structure + E LayerNorm MLPs.

    The token learner is shared by the members (as SERL shares its encoder); every member has its
    own hidden layers and its own output layer (hil-serl#33: a shared output layer makes the
    members one critic).
    """

    def __init__(self, feat_dim: int, state_dim: int, action_dim: int, width: int, num_queries: int,
                 members: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.pool = TokenLearner(feat_dim, width, num_queries)
        self.members = members
        in_dim = self.pool.out_dim + state_dim + action_dim

        def drop() -> list[nn.Module]:  # DroQ's order: linear -> dropout -> LayerNorm -> ReLU
            return [nn.Dropout(dropout)] if dropout > 0 else []

        self.net = nn.Sequential(
            EnsembleLinear(members, in_dim, hidden), *drop(), EnsembleLayerNorm(members, hidden), nn.ReLU(),
            EnsembleLinear(members, hidden, hidden), *drop(), EnsembleLayerNorm(members, hidden), nn.ReLU(),
            EnsembleLinear(members, hidden, 1))

    def q(self, pooled: torch.Tensor, state: torch.Tensor, action: torch.Tensor,
          members: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P) pooled latent -> (E, B) Q values (E = len(members) when a subset is given).

        The pooled latent is computed once for all members (the token learner is shared)."""
        x = torch.cat([pooled, state, action], dim=-1)  # (B, in): the first layer takes it unexpanded
        for layer in self.net:
            x = layer(x, members) if isinstance(layer, (EnsembleLinear, EnsembleLayerNorm)) else layer(x)
        return x.squeeze(-1)

    def forward(self, hidden, mask, state, action, members: torch.Tensor | None = None) -> torch.Tensor:
        return self.q(self.pool(hidden, mask), state, action, members)


class frozen_params:
    """Context: the module's parameters need no gradient while the graph is built (the actor loss
    differentiates Q w.r.t. the action only; computing the critic's weight gradients there is
    wasted work that the next critic step zeroes anyway). Restores the flags on exit."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


# ============================================================================ losses
def critic_loss(learner: "SACLearner", batch: dict, cfg: SACConfig) -> tuple[torch.Tensor, dict]:
    """Ensemble TD regression; target = r + gamma * (1 - done) * min over 2 random target members.

    `done` is 1 only where the episode terminated (success); truncated steps bootstrap. With
    `mc_lower_bound`, a target is floored by the Monte-Carlo return of its episode where that is
    known (demos, finished online episodes): Cal-QL's calibration, the critic may not value an
    action below what it actually earned.
    """
    policy, critic, target = learner.policy, learner.critic, learner.target_critic
    with torch.no_grad():
        dist = policy.distribution(batch["next_hidden"], batch["next_mask"], batch["next_state"])
        next_action, next_logp = policy.squashed_sample(dist)
        members = torch.randperm(cfg.num_critics, generator=learner.gen)[: cfg.target_critics].to(next_action.device)
        q_next = target(batch["next_hidden"], batch["next_mask"], batch["next_state"],
                        unit_action(policy, next_action), members=members).min(0).values  # only those members run
        if cfg.backup_entropy:
            q_next = q_next - learner.alpha * next_logp
        td_target = batch["reward"] + cfg.gamma * (1.0 - batch["done"]) * q_next
        if cfg.mc_lower_bound:
            td_target = torch.maximum(td_target, batch["mc_return"])  # -inf where unknown
    pooled = critic.pool(batch["hidden"], batch["mask"])
    q = critic.q(pooled, batch["state"], unit_action(policy, batch["action"]))  # (E, B)
    loss = 0.5 * (q - td_target.unsqueeze(0)).pow(2).mean(1).sum()
    batch["critic_pooled"] = pooled.detach()  # the actor's Q term reuses it (no gradient to the critic)
    return loss, {"critic_loss": loss.item() / cfg.num_critics, "q_mean": q.mean().item(),
                  "td_target_mean": td_target.mean().item()}


def actor_loss(learner: "SACLearner", batch: dict, cfg: SACConfig, bc_weight: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SAC actor loss (alpha * log pi - mean ensemble Q) + a behaviour regulariser.

    The regulariser (TD3+BC's form, Q term normalised by mean |Q|) pulls the deterministic action
    toward the demo action on demo rows and, on online rows, as `online_bc` says: toward the
    executed action of successful episodes (self-imitation), or toward the collecting policy's
    action (a trust region). Returns (loss, log pi of the samples (for the temperature), stats).
    """
    policy = learner.policy
    if cfg.actor_objective == "awac":
        return awac_actor_loss(learner, batch, cfg)
    if cfg.actor_objective != "sac":
        raise ValueError(f"sac.actor_objective must be 'sac' or 'awac', got {cfg.actor_objective!r}")
    head_out = policy.actor(batch["hidden"], batch["mask"], batch["state"])
    std = policy.actor.log_std.clamp(-5.0, 1.0).exp().expand_as(head_out)
    dist = torch.distributions.Normal(head_out, std)
    action, logp = policy.squashed_sample(dist)
    pooled = batch.get("critic_pooled")
    if pooled is None:
        with torch.no_grad():
            pooled = learner.critic.pool(batch["hidden"], batch["mask"])
    with frozen_params(learner.critic):  # gradient to the action only, none to the critic's weights
        q = learner.critic.q(pooled, batch["state"], unit_action(policy, action)).mean(0)
    sac_term = learner.alpha * logp - q
    q_scale = q.abs().mean().detach().clamp(min=1e-2) if cfg.normalize_actor_q else torch.ones(())
    loss = sac_term.mean() / q_scale
    reg = torch.zeros(())
    if bc_weight > 0:
        demo = batch["is_demo"]
        if cfg.online_bc == "success":
            target, weight = batch["action"], (demo | (batch["success"] > 0)).float()
        elif cfg.online_bc == "behaviour":
            target, weight = torch.where(demo.unsqueeze(-1), batch["action"], batch["behaviour_action"]), torch.ones_like(q)
        elif cfg.online_bc == "none":
            target, weight = batch["action"], demo.float()
        else:
            raise ValueError(f"sac.online_bc must be 'success', 'behaviour' or 'none', got {cfg.online_bc!r}")
        # In the pre-squash space, like AWAC: well conditioned even where the normalized box is
        # lopsided (a gripper the expert barely moves has std ~0.05 -> box [-35, 0.7]).
        reg = ((head_out - pre_squash(policy, target)).pow(2).sum(-1) * weight).mean()
        loss = loss + bc_weight * reg
    return loss, logp.detach(), {"actor_loss": loss.item(), "q_pi": q.mean().item(), "logp": logp.mean().item(),
                                 "bc_reg": reg.item(), "bc_weight": bc_weight,
                                 "log_std": policy.actor.log_std.mean().item()}  # exploration noise (entropy term moves it)


def unit_action(policy: VLAPolicy, a_n: torch.Tensor) -> torch.Tensor:
    """Normalized action -> the unit box [-1, 1] (what the critic sees: well scaled in every dimension)."""
    c, h = policy.squash_box()
    return (a_n - c) / h


def pre_squash(policy: VLAPolicy, a_n: torch.Tensor, limit: float = 3.0) -> torch.Tensor:
    """Normalized action -> the tanh head's pre-squash value, capped at +-limit (a bound maps to 3)."""
    c, h = policy.squash_box()
    return torch.atanh(((a_n - c) / h).clamp(-math.tanh(limit), math.tanh(limit)))


def awac_actor_loss(learner: "SACLearner", batch: dict, cfg: SACConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """AWAC (Nair et al. 2020) on the deterministic action: weighted MSE onto the stored actions.

    weight = min(exp((Q(s, a) - Q(s, a_pi)) / beta), max_weight), Q the ensemble mean, no gradient:
    demo and online actions that beat the current policy's are imitated, the others barely. With
    a fixed exploration noise the weighted log-likelihood is this weighted MSE up to a constant.
    """
    policy = learner.policy
    head_out = policy.actor(batch["hidden"], batch["mask"], batch["state"])
    with torch.no_grad():
        std = policy.actor.log_std.clamp(-5.0, 1.0).exp().expand_as(head_out)
        a_pi, logp = policy.squashed_sample(torch.distributions.Normal(head_out, std))
        pooled = batch.get("critic_pooled")
        if pooled is None:
            pooled = learner.critic.pool(batch["hidden"], batch["mask"])
        q_data = learner.critic.q(pooled, batch["state"], unit_action(policy, batch["action"])).mean(0)
        q_pi = learner.critic.q(pooled, batch["state"], unit_action(policy, a_pi)).mean(0)
        adv = q_data - q_pi
        weight = torch.exp(adv / cfg.awac_beta).clamp(max=cfg.awac_max_weight)
    # In the pre-squash space: the head's Gaussian mean regressed onto atanh of the executed action
    # is the weighted maximum likelihood of those actions. (Regressing tanh(mean) onto noisy
    # squashed samples would shrink saturated actions toward the centre: measured, a slower arm.)
    err = (head_out - pre_squash(policy, batch["action"])).pow(2).sum(-1)
    loss = (weight * err).mean()
    return loss, logp, {"actor_loss": loss.item(), "q_pi": q_pi.mean().item(), "adv_mean": adv.mean().item(),
                        "awac_weight_mean": weight.mean().item(), "bc_reg": err.mean().item(), "logp": logp.mean().item()}


def temperature_loss(log_alpha: torch.Tensor, logp: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """Auto-tuned temperature: alpha rises while the entropy (-log pi) is below the target."""
    return -(log_alpha * (logp + target_entropy)).mean()


# ============================================================================ learner
class SACLearner:
    """Actor (the policy's head), critic ensemble + target, temperature, and their optimizers."""

    def __init__(self, policy: VLAPolicy, cfg: SACConfig, device=None):
        self.policy, self.cfg = policy, cfg
        self.device = device or policy.device
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.max_log_std is not None and cfg.init_log_std > cfg.max_log_std:
            raise ValueError(f"sac.init_log_std {cfg.init_log_std} is above sac.max_log_std {cfg.max_log_std}: "
                             "raise max_log_std with it (or set it to null: no bound)")
        policy.freeze_backbone()
        if policy.cfg.action_squash != "tanh":
            raise ValueError("SAC needs the tanh head: call distill_to_tanh first")
        pc = policy.cfg
        # Re-initialised at every Stage 1, as the paper does for its critic.
        self.critic = CriticEnsemble(policy.backbone.hidden_size, len(pc.joint_names), pc.action_spec.dim,
                                     pc.head_width, pc.head_queries, cfg.num_critics, cfg.critic_hidden,
                                     cfg.critic_dropout).to(self.device)
        if cfg.critic_pool_init == "actor":
            self.critic.pool.load_state_dict(policy.actor.pool.state_dict())
        elif cfg.critic_pool_init != "random":
            raise ValueError(f"sac.critic_pool_init must be 'actor' or 'random', got {cfg.critic_pool_init!r}")
        if not cfg.critic_train_pool:
            self.critic.pool.requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.target_entropy = cfg.resolved_target_entropy(pc.action_spec.dim)
        policy.actor.requires_grad_(True)
        if not cfg.actor_train_pool:  # no gradient, no backward through it (SFT's unfreeze_lora restores it)
            policy.actor.pool.requires_grad_(False)
        self.actor_opt = torch.optim.Adam([p for p in policy.head_parameters() if p.requires_grad], lr=cfg.lr_actor)
        self.critic_opt = torch.optim.Adam([p for p in self.critic.parameters() if p.requires_grad], lr=cfg.lr_critic)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.lr_temperature)
        self.critic_updates = 0
        self.actor_updates = 0
        self.actor_average = ([p.detach().clone() for p in policy.actor.parameters()]
                              if cfg.head_average_tau > 0 else None)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    def bc_weight(self) -> float:
        c = self.cfg
        frac = min(1.0, self.actor_updates / max(c.bc_anneal_updates, 1))
        return c.bc_weight + (c.bc_weight_final - c.bc_weight) * frac

    def update(self, batch: dict, *, update_actor: bool = True) -> dict:
        cfg = self.cfg
        self.policy.actor.train()
        loss, stats = critic_loss(self, batch, cfg)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
        self.critic_opt.step()
        soft_update(self.target_critic, self.critic, cfg.tau)
        self.critic_updates += 1
        if update_actor:
            loss, logp, s = actor_loss(self, batch, cfg, self.bc_weight())
            self.actor_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.actor_opt.param_groups[0]["params"], cfg.grad_clip)
            self.actor_opt.step()
            with torch.no_grad():
                if cfg.max_log_std is not None:
                    self.policy.actor.log_std.clamp_(max=cfg.max_log_std)
                if self.actor_average is not None:
                    for avg, p in zip(self.actor_average, self.policy.actor.parameters()):
                        avg.lerp_(p, cfg.head_average_tau)
            a_loss = temperature_loss(self.log_alpha, logp, self.target_entropy)
            self.alpha_opt.zero_grad(set_to_none=True)
            a_loss.backward()
            self.alpha_opt.step()
            self.actor_updates += 1
            stats |= s | {"alpha": float(self.alpha)}
        return stats

    @contextlib.contextmanager
    def published_actor(self):
        """Inside: the actor holds what gets published (the running average with head_average_tau > 0)."""
        if self.actor_average is None:
            yield
            return
        params = list(self.policy.actor.parameters())
        trained = [p.detach().clone() for p in params]
        self.adopt_published()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(params, trained):
                    p.copy_(t)

    @torch.no_grad()
    def adopt_published(self) -> None:
        """The actor becomes what would be published (the running average; no-op without one):
        the result of a Stage 1 that averages is the head it deploys."""
        if self.actor_average is not None:
            for p, avg in zip(self.policy.actor.parameters(), self.actor_average):
                p.copy_(avg)

    def train(self, online: LatentReplay | None, demo: LatentReplay | None, n_updates: int, *,
              critic_only: bool = False) -> dict:
        """n critic updates on mixed batches; the actor every `critic_actor_ratio` of them."""
        stats: list[dict] = []
        for _ in range(n_updates):
            batch = sample_mixed(online, demo, self.cfg.batch_size, self.cfg.demo_fraction, self.gen, self.device)
            actor_now = (not critic_only and (self.critic_updates + 1) % self.cfg.critic_actor_ratio == 0
                         and online is not None and online.added >= self.cfg.actor_learning_starts)
            stats.append(self.update(batch, update_actor=actor_now))
        self.policy.eval()
        if not stats:
            return {}
        keys = set().union(*stats)
        mean = {k: float(np.mean([s[k] for s in stats if k in s])) for k in keys}
        # TensorBoard (a no-op unless --tensorboard enabled it): losses, Q, alpha, log-prob, lrs
        tb.log("sac", {**mean, "lr_actor": self.actor_opt.param_groups[0]["lr"],
                       "lr_critic": self.critic_opt.param_groups[0]["lr"]})
        return mean


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)


def distill_to_tanh(policy: VLAPolicy, replays: list[LatentReplay], steps: int, *, batch_size: int = 256,
                    lr: float = 1e-3, seed: int = 0) -> dict:
    """Turns a "clip" head into a "tanh" head that acts the same, on stored latents.

    The clip head's deterministic action clip(mu) (kept a hair inside the bounds) is the target of
    the tanh head's deterministic action c + h * tanh(u), MSE: SAC then starts from the Stage 0
    behaviour instead of from a different policy. No-op for a head that is tanh already.
    """
    if policy.cfg.action_squash == "tanh":
        return {"distill_steps": 0}
    teacher = copy.deepcopy(policy.actor).requires_grad_(False).eval()
    low, high = policy.normalized_bounds()
    margin = 0.01 * (high - low)
    policy.cfg.action_squash = "tanh"
    opt = torch.optim.Adam(policy.head_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pools = [r for r in replays if r is not None and len(r)]
    if not pools:
        raise ValueError("distill_to_tanh needs latents (an empty demo buffer?)")
    losses = []
    policy.actor.train()
    for step in range(steps):
        b = pools[step % len(pools)].sample(batch_size, gen, policy.device)
        with torch.no_grad():
            target = pre_squash(policy, torch.maximum(torch.minimum(teacher(b["hidden"], b["mask"], b["state"]),
                                                                    high - margin), low + margin))
        loss = nn.functional.mse_loss(policy.actor(b["hidden"], b["mask"], b["state"]), target)  # pre-squash space
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.eval()
    return {"distill_steps": steps, "distill_loss_first": float(np.mean(losses[:10])) if losses else 0.0,
            "distill_loss_last": float(np.mean(losses[-10:])) if losses else 0.0}


def config_dict(cfg: SACConfig) -> dict:
    return asdict(cfg)
