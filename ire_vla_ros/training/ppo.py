"""Stage 1 of iRe-VLA: PPO on the action head with the VLM backbone frozen.

Because the backbone is frozen, its output for an observation never changes during Stage 1: it runs
once per observation while acting, and the `FrozenFeatureCache` keeps those hidden states with the
rollout. PPO's epochs then only run the small token-learner heads. (With `freeze_backbone=False`, the
ablation, every minibatch re-runs the backbone on the stored images so gradients reach LoRA.)

The update follows CleanRL's ppo_continuous_action.py: GAE, advantage normalization, clipped
surrogate, value loss, entropy bonus, global grad-norm clipping, target-KL early stop. The loss is in
`ppo_loss`, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..vla.policy import VLAPolicy
from . import tb
from .config import PPOConfig


@dataclass
class FrozenFeatureCache:
    """One PPO batch: frozen backbone features plus what PPO needs per step, shape (T, N, ...).

    T = rollout length, N = number of environments. `images`/`instructions` are kept only when the
    backbone is not frozen (ablation), since then features must be recomputed.
    """

    hidden: torch.Tensor  # (T, N, m, d)
    mask: torch.Tensor  # (T, N, m) bool
    states: torch.Tensor  # (T, N, S) normalized joint positions
    actions: torch.Tensor  # (T, N, A) normalized sampled actions
    log_probs: torch.Tensor  # (T, N)
    values: torch.Tensor  # (T, N)
    rewards: torch.Tensor  # (T, N)
    dones: torch.Tensor  # (T, N) 1 where the episode ended at this step by termination (success)
    timeouts: torch.Tensor  # (T, N) 1 where it ended by truncation: bootstrapped, not a terminal
    timeout_values: torch.Tensor  # (T, N) V(final obs) for truncated steps
    last_values: torch.Tensor  # (N,) V(obs after the last step)
    images: np.ndarray | None = None  # (T, N, H, W, 3) uint8
    instructions: list[list[str]] | None = None  # [T][N]
    advantages: torch.Tensor | None = field(default=None)
    returns: torch.Tensor | None = field(default=None)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rewards.shape)


def compute_gae(batch: FrozenFeatureCache, gamma: float, lam: float) -> None:
    """Generalized advantage estimation; truncation bootstraps with V(final obs)."""
    T, _ = batch.shape
    rewards = batch.rewards + gamma * batch.timeout_values * batch.timeouts
    episode_end = torch.clamp(batch.dones + batch.timeouts, max=1.0)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(batch.last_values)
    for t in reversed(range(T)):
        next_value = batch.last_values if t == T - 1 else batch.values[t + 1]
        not_end = 1.0 - episode_end[t]
        delta = rewards[t] + gamma * next_value * not_end - batch.values[t]
        last = delta + gamma * lam * not_end * last
        adv[t] = last
    batch.advantages = adv
    batch.returns = adv + batch.values


def ppo_loss(new_log_prob, old_log_prob, advantages, new_value, returns, entropy, cfg: PPOConfig):
    """The PPO objective: clipped surrogate + value regression - entropy bonus."""
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()
    if cfg.norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
    v_loss = 0.5 * (new_value - returns).pow(2).mean()
    ent = entropy.mean()
    loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # the k3 estimator, as in CleanRL
        clipfrac = ((ratio - 1.0).abs() > cfg.clip_coef).float().mean()
    return loss, {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": ent.item(),
                  "approx_kl": approx_kl.item(), "clipfrac": clipfrac.item()}


def make_ppo_optimizer(policy: VLAPolicy, cfg: PPOConfig) -> torch.optim.Optimizer:
    groups = [{"params": policy.head_parameters(), "lr": cfg.lr_actor},
              {"params": list(policy.critic.parameters()), "lr": cfg.lr_critic}]
    if not cfg.freeze_backbone:
        groups.append({"params": policy.lora_parameters(), "lr": cfg.lr_actor})
    return torch.optim.Adam(groups, eps=1e-5)


def _features(policy: VLAPolicy, batch: FrozenFeatureCache, t_idx, n_idx, frozen: bool, recompute: bool = False):
    if frozen and not recompute:
        return batch.hidden[t_idx, n_idx], batch.mask[t_idx, n_idx]
    if frozen:  # same numbers as the cache, paid again: only bench/bench_ppo_feature_cache.py does this
        with torch.no_grad():
            return _features(policy, batch, t_idx, n_idx, False)
    images = batch.images[t_idx.cpu().numpy(), n_idx.cpu().numpy()]
    texts = [batch.instructions[t][n] for t, n in zip(t_idx.tolist(), n_idx.tolist())]
    return policy.encode(images, texts)


def ppo_update(policy: VLAPolicy, optimizer: torch.optim.Optimizer, batch: FrozenFeatureCache,
               cfg: PPOConfig, *, value_only: bool = False, recompute_features: bool = False) -> dict:
    """PPO epochs over one batch. Returns the mean statistics of the last epoch run.

    `recompute_features` re-runs the frozen backbone for every minibatch instead of reading the
    cache; it exists only to measure what the cache saves.
    """
    frozen = cfg.freeze_backbone
    if frozen:
        policy.freeze_backbone()
    else:
        policy.unfreeze_lora()
    policy.actor.train()
    policy.critic.train()
    T, N = batch.shape
    total = T * N
    t_all = torch.arange(T).repeat_interleave(N)
    n_all = torch.arange(N).repeat(T)
    gen = torch.Generator().manual_seed(cfg.seed)
    stats: dict = {}
    epochs_run = 0
    for _ in range(cfg.update_epochs):
        perm = torch.randperm(total, generator=gen)
        epoch_stats = []
        for start in range(0, total, cfg.minibatch_size):
            mb = perm[start:start + cfg.minibatch_size]
            t_idx, n_idx = t_all[mb].to(policy.device), n_all[mb].to(policy.device)
            hidden, mask = _features(policy, batch, t_idx, n_idx, frozen, recompute_features)
            state = batch.states[t_idx, n_idx]
            new_value = policy.value(hidden.detach() if frozen else hidden, mask, state)
            if value_only:
                v_loss = 0.5 * (new_value - batch.returns[t_idx, n_idx]).pow(2).mean()
                loss, s = v_loss, {"v_loss": v_loss.item()}
            else:
                dist = policy.distribution(hidden, mask, state)
                new_log_prob = policy.log_prob(dist, batch.actions[t_idx, n_idx])
                loss, s = ppo_loss(new_log_prob, batch.log_probs[t_idx, n_idx], batch.advantages[t_idx, n_idx],
                                   new_value, batch.returns[t_idx, n_idx], dist.entropy().sum(-1), cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clip each parameter group on its own: the critic's gradient (value targets can be
            # large with dense reward) must not shrink the actor's step through a shared norm.
            for group in optimizer.param_groups:
                nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
            optimizer.step()
            epoch_stats.append(s)
        epochs_run += 1
        stats = {k: float(np.mean([s[k] for s in epoch_stats])) for k in epoch_stats[0]}
        if not value_only and cfg.target_kl is not None and stats["approx_kl"] > cfg.target_kl:
            break  # the policy moved far enough from the one that collected the data
    stats["epochs"] = epochs_run
    with torch.no_grad():
        stats["log_std_mean"] = float(policy.actor.log_std.mean())
    tb.log("ppo", {**stats, "value_mean": float(batch.values.mean()), "return_mean": float(batch.returns.mean()),
                   "reward_mean": float(batch.rewards.mean()), "lr_actor": optimizer.param_groups[0]["lr"],
                   "lr_critic": optimizer.param_groups[1]["lr"]})
    return stats
