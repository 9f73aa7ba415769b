"""The three iRe-VLA stages as functions, used by the sim demo (`ire-vla iterate`) and by the robot's
offline trainer (`ire-vla train offline`, which the trainer node runs).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..episodes.dataset import EpisodeStepDataset
from ..episodes.store import read_episode
from ..vla.backbone import BackboneConfig
from ..vla.policy import PolicyConfig, VLAPolicy
from .config import IterateConfig, PPOConfig, SFTConfig
from .ppo import FrozenFeatureCache, compute_gae, make_ppo_optimizer, ppo_update
from .sft import build_sft_data, set_normalization_from, train_sft

log = logging.getLogger(__name__)
Progress = Callable[[str, float, str], None]  # (stage, fraction, message)


def _noop(stage: str, fraction: float, message: str) -> None:
    pass


def new_policy(cfg: IterateConfig, action_spec, joint_names, device: str) -> VLAPolicy:
    hp = cfg.policy
    backbone = BackboneConfig.from_dict({"image_size": cfg.env.image_size, "seed": cfg.seed, **hp.backbone})
    # PolicyHParams holds PolicyConfig's sizes (head, LoRA) as YAML sees them: passed through by name.
    sizes = {k: v for k, v in dataclasses.asdict(hp).items() if k != "backbone"}
    pcfg = PolicyConfig(backbone=backbone, action_spec=action_spec, joint_names=list(joint_names), **sizes)
    torch.manual_seed(cfg.seed)
    return VLAPolicy(pcfg).to(device)


def load_datasets(expert_paths, online_paths, on_error="skip"):
    expert = EpisodeStepDataset(expert_paths, on_error=on_error)
    if len(expert) == 0:
        raise ValueError("no usable expert episodes: record teleop demonstrations first")
    online = EpisodeStepDataset(online_paths, on_error=on_error) if online_paths else None
    for ds in (expert, online):
        for path, reason in (ds.skipped if ds is not None else []):
            log.warning("skipping episode %s: %s", path, reason)
    return expert, online


def stage0_sft(policy: VLAPolicy, expert_paths, cfg: SFTConfig, progress: bool = True) -> dict:
    """Stage 0: LoRA + head on expert demonstrations; sets the normalization statistics."""
    expert, _ = load_datasets(expert_paths, [])
    data = build_sft_data(expert, None, 0.0)
    set_normalization_from(policy, data)
    return train_sft(policy, data, cfg, desc="Stage 0 SFT", progress=progress)


def stage2_sft(policy: VLAPolicy, expert_paths, online_paths, cfg: SFTConfig, progress: bool = True) -> dict:
    """Stage 2: LoRA + head on expert + successful online episodes (normalization kept)."""
    expert, online = load_datasets(expert_paths, online_paths)
    data = build_sft_data(expert, online, cfg.online_fraction)
    return train_sft(policy, data, cfg, desc="Stage 2 SFT", progress=progress)


def begin_stage1(policy: VLAPolicy, cfg: PPOConfig) -> torch.optim.Optimizer:
    """Freeze the VLM, reset exploration noise, fresh critic (the paper's Stage 1 set-up)."""
    policy.freeze_backbone()
    policy.reset_critic(seed=cfg.seed)
    with torch.no_grad():
        policy.actor.log_std.fill_(cfg.init_log_std)
    return make_ppo_optimizer(policy, cfg)


def stage1_ppo_sim(policy: VLAPolicy, envs, cfg: PPOConfig, *, episode_root: Path | None, iteration: int,
                   report: Progress = _noop, progress: bool = True, seed_start: int | None = None) -> dict:
    """Stage 1 in simulation: online PPO on the head; successful episodes kept for Stage 2."""
    from .rollout import RolloutCollector

    optimizer = begin_stage1(policy, cfg)
    collector = RolloutCollector(envs, cfg, seed_start=seed_start, episode_root=episode_root, iteration=iteration)
    per_update = cfg.rollout_len * len(envs)
    n_updates = max(1, cfg.total_env_steps // per_update)
    history = []
    bar = tqdm(range(n_updates), desc="Stage 1 PPO", disable=not progress)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for u in bar:
        if cfg.anneal_lr:
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * (1.0 - u / n_updates)
        batch = collector.collect(policy, cfg.rollout_len)
        compute_gae(batch, cfg.gamma, cfg.gae_lambda)
        stats = ppo_update(policy, optimizer, batch, cfg, value_only=u < cfg.critic_warmup_rollouts)
        recent = collector.recent[-50:]
        stats.update(update=u, env_steps=(u + 1) * per_update, episodes=collector.episodes_done,
                     train_success_rate=float(np.mean([s for _, s in recent])) if recent else 0.0,
                     mean_reward=float(batch.rewards.mean()))
        history.append(stats)
        bar.set_postfix(succ=f"{stats['train_success_rate']:.2f}", v_loss=f"{stats['v_loss']:.4f}")
        report("stage1", (u + 1) / n_updates, f"update {u + 1}/{n_updates} train success {stats['train_success_rate']:.2f}")
    policy.eval()
    return {"updates": history, "episodes": collector.episodes_done, "successes": collector.successes,
            "saved_episodes": [str(p) for p in collector.saved]}


@torch.no_grad()
def cache_from_episodes(policy: VLAPolicy, paths, cfg: PPOConfig, batch_size: int = 64) -> FrozenFeatureCache:
    """Builds a PPO batch from recorded robot episodes: the frozen backbone runs once per frame.

    The episodes were recorded by the current checkpoint (on-policy), so old log-probs are those
    of the current actor on the recorded (clipped) actions. Each episode becomes one column of
    length T_max, padded with masked steps (zero reward, done) after its end.
    """
    episodes = [read_episode(p) for p in paths]
    T = max(e.n_steps for e in episodes)
    N = len(episodes)
    first = policy.encode(episodes[0].images["main"][:1], [episodes[0].instruction])[0]
    m, d = first.shape[1], first.shape[2]
    dev = policy.device
    hidden = torch.zeros(T, N, m, d, device=dev)
    mask = torch.zeros(T, N, m, dtype=torch.bool, device=dev)
    mask[..., 0] = True  # padded steps still need one attendable token
    S, A = len(policy.joint_names), policy.action_spec.dim
    states = torch.zeros(T, N, S, device=dev)
    actions = torch.zeros(T, N, A, device=dev)
    rewards = torch.zeros(T, N, device=dev)
    dones = torch.zeros(T, N, device=dev)
    valid = torch.zeros(T, N, device=dev)
    for n, ep in enumerate(episodes):
        imgs = ep.images["main"]
        for s in range(0, ep.n_steps, batch_size):
            h, mk = policy.encode(imgs[s:s + batch_size], [ep.instruction] * len(imgs[s:s + batch_size]))
            hidden[s:s + len(h), n, : h.shape[1]] = h
            mask[s:s + len(h), n, : h.shape[1]] = mk.bool()
        states[: ep.n_steps, n] = policy.normalize_state(ep.joint_positions)
        actions[: ep.n_steps, n] = policy.normalize_action(ep.actions)
        rewards[: ep.n_steps, n] = torch.as_tensor(ep.rewards, device=dev)
        dones[ep.n_steps - 1:, n] = 1.0
        valid[: ep.n_steps, n] = 1.0
    st = states.reshape(T * N, S)
    h2, m2 = hidden.reshape(T * N, m, d), mask.reshape(T * N, m)
    log_probs = policy.log_prob(policy.distribution(h2, m2, st), actions.reshape(T * N, A)).reshape(T, N)
    values = policy.value(h2, m2, st).reshape(T, N) * valid
    zeros = torch.zeros(T, N, device=dev)
    return FrozenFeatureCache(hidden=hidden, mask=mask, states=states, actions=actions, log_probs=log_probs,
                              values=values, rewards=rewards, dones=dones, timeouts=zeros,
                              timeout_values=zeros, last_values=torch.zeros(N, device=dev))


def stage1_ppo_offline(policy: VLAPolicy, online_paths, cfg: PPOConfig, report: Progress = _noop) -> dict:
    """Stage 1 on the robot: PPO updates of the head from episodes the policy node recorded."""
    optimizer = begin_stage1(policy, cfg)
    batch = cache_from_episodes(policy, online_paths, cfg)
    compute_gae(batch, cfg.gamma, cfg.gae_lambda)
    for _ in range(cfg.critic_warmup_rollouts):  # one recorded batch: warm the critic on it first
        ppo_update(policy, optimizer, batch, cfg, value_only=True)
    report("stage1", 0.5, f"PPO on {len(online_paths)} recorded episodes")
    stats = ppo_update(policy, optimizer, batch, cfg)
    policy.eval()
    return {"episodes": len(online_paths), "update": stats}
