"""The three iRe-VLA stages as functions, used by the sim demo (`ire-vla iterate`) and by the robot's
offline trainer (`ire-vla train offline`, which the trainer node runs).

Stage 1 comes in two algorithms (`stage1.algo`): SAC from demonstrations on cached latents
(`training/sac.py`, the paper's real-robot recipe) and PPO (`training/ppo.py`, the paper's sim one).
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
from .sac import LatentReplay, SACConfig, SACLearner, add_episode, backbone_tag, distill_to_tanh
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
                   report: Progress = _noop, progress: bool = True, seed_start: int | None = None,
                   eval_fn=None, eval_every: int = 0) -> dict:
    """Stage 1 in simulation: online PPO on the head; successful episodes kept for Stage 2.

    `eval_fn(policy) -> dict`, when given, runs at the start and every `eval_every` env steps
    (a success-vs-steps curve, as the Stage 1 benchmark draws)."""
    from .rollout import RolloutCollector

    optimizer = begin_stage1(policy, cfg)
    collector = RolloutCollector(envs, cfg, seed_start=seed_start, episode_root=episode_root, iteration=iteration)
    per_update = cfg.rollout_len * len(envs)
    n_updates = max(1, cfg.total_env_steps // per_update)
    history = []
    curve = [{"env_steps": 0, **eval_fn(policy)}] if eval_fn is not None else []
    bar = tqdm(range(n_updates), desc="Stage 1 PPO", disable=not progress)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    try:
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
            report("stage1", (u + 1) / n_updates,
                   f"update {u + 1}/{n_updates} train success {stats['train_success_rate']:.2f}")
            steps = (u + 1) * per_update
            crossed = steps // eval_every > u * per_update // eval_every if eval_every else False
            if eval_fn is not None and eval_every and (crossed or u == n_updates - 1):
                curve.append({"env_steps": steps, **eval_fn(policy)})
    finally:
        collector.close()  # its episode-writer child
    policy.eval()
    return {"updates": history, "episodes": collector.episodes_done, "successes": collector.successes,
            "saved_episodes": [str(p) for p in collector.saved], "episode_write_failures": collector.write_failures,
            "curve": curve}


@torch.no_grad()
def cache_from_episodes(policy: VLAPolicy, paths, cfg: PPOConfig, batch_size: int = 64) -> FrozenFeatureCache:
    """Builds a PPO batch from recorded robot episodes: the frozen backbone runs once per frame.

    The episodes were recorded by the current checkpoint (on-policy), so old log-probs are those
    of the current actor on the recorded (clipped) actions. Each episode becomes one column of
    length T_max, padded with masked steps (zero reward, done) after its end.
    """
    from ..vla.precision import LATENT_DTYPE

    # Frames are read one episode at a time and the latents kept in fp16: at 640x480 and a
    # BLIP-2-sized latent, all episodes' frames or fp32 latents at once would not fit in RAM.
    paths = list(paths)
    lengths = [read_episode(p, load_images=False).n_steps for p in paths]
    T, N = max(lengths), len(paths)
    first_ep = read_episode(paths[0])
    with torch.no_grad():
        first = policy.encode(first_ep.images["main"][:1], [first_ep.instruction])[0]
    m, d = first.shape[1], first.shape[2]
    dev = policy.device
    hidden = torch.zeros(T, N, m, d, dtype=LATENT_DTYPE, device=dev)
    mask = torch.zeros(T, N, m, dtype=torch.bool, device=dev)
    mask[..., 0] = True  # padded steps still need one attendable token
    S, A = len(policy.joint_names), policy.action_spec.dim
    states = torch.zeros(T, N, S, device=dev)
    actions = torch.zeros(T, N, A, device=dev)
    rewards = torch.zeros(T, N, device=dev)
    dones = torch.zeros(T, N, device=dev)
    valid = torch.zeros(T, N, device=dev)
    for n, path in enumerate(paths):
        ep = first_ep if n == 0 else read_episode(path)
        imgs = ep.images["main"]
        for s in range(0, ep.n_steps, batch_size):
            with torch.no_grad():
                h, mk = policy.encode(imgs[s:s + batch_size], [ep.instruction] * len(imgs[s:s + batch_size]))
            hidden[s:s + len(h), n, : h.shape[1]] = h.to(LATENT_DTYPE)
            mask[s:s + len(h), n, : h.shape[1]] = mk.bool()
        states[: ep.n_steps, n] = policy.normalize_state(ep.joint_positions)
        actions[: ep.n_steps, n] = policy.normalize_action(ep.actions)
        rewards[: ep.n_steps, n] = torch.as_tensor(ep.rewards, device=dev)
        dones[ep.n_steps - 1:, n] = 1.0
        valid[: ep.n_steps, n] = 1.0
        del ep, imgs
    first_ep = None
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


# ---------------------------------------------------------------------------------------- SACfD
def _latent_tokens(policy: VLAPolicy, episodes) -> int:
    """Tokens per latent: the longest over the episodes' instructions (a pretrained processor
    pads per batch; the tiny preset always gives query tokens + max_text_tokens)."""
    tokens = 0
    with torch.no_grad():
        for ep in episodes:
            img = next(iter(ep.images.values()))[:1]
            tokens = max(tokens, policy.encode(img, [ep.instruction])[0].shape[1])
    return tokens


def encode_episodes(policy: VLAPolicy, paths, cfg: SACConfig, capacity_bytes: int, tag: str,
                    tokens: int | None = None) -> LatentReplay:
    """A replay holding the transitions of recorded episodes, each frame encoded once.

    Episodes are read one at a time, so only one episode's images and the fp16 buffer are in
    memory; the buffer is sized to the episodes (at most `capacity_bytes`, oldest dropped first).
    """
    infos = [read_episode(p, load_images=False) for p in paths]
    if not infos:
        raise ValueError("no episodes to encode")
    if tokens is None:
        tokens = _latent_tokens(policy, [read_episode(paths[0])])
    from .sac import bytes_per_transition

    S, A = len(policy.joint_names), policy.action_spec.dim
    bpt = bytes_per_transition(tokens, policy.backbone.hidden_size, S, A)
    need = sum(e.n_steps for e in infos) * bpt
    replay = LatentReplay(min(capacity_bytes, need), tokens, policy.backbone.hidden_size, S, A, tag)
    for p in paths:
        add_episode(replay, policy, read_episode(p), cfg, tag)
    return replay


def begin_stage1_sac(policy: VLAPolicy, demo_paths, cfg: SACConfig, report: Progress = _noop) -> tuple[SACLearner, LatentReplay, dict]:
    """Stage 1 set-up: frozen VLM, demo latents, tanh head (distilled from a clip head), fresh
    critic pre-trained on the demos (TD with the Monte-Carlo floor), exploration noise reset."""
    policy.freeze_backbone()
    tag = backbone_tag(policy)
    report("stage1", 0.0, f"encoding {len(demo_paths)} demo episodes (frozen VLM, once per frame)")
    demo = encode_episodes(policy, list(demo_paths), cfg, cfg.demo_buffer_bytes, tag)
    stats = {"demo_transitions": len(demo), "bytes_per_transition": demo.bytes_per_transition,
             "latent_tag": tag, **distill_to_tanh(policy, [demo], cfg.distill_steps, seed=cfg.seed)}
    with torch.no_grad():
        policy.actor.log_std.fill_(cfg.init_log_std)
    learner = SACLearner(policy, cfg)
    report("stage1", 0.0, f"critic pre-training: {cfg.critic_pretrain_steps} updates on the demos")
    pre = learner.train(None, demo, cfg.critic_pretrain_steps, critic_only=True)
    stats["critic_pretrain"] = pre
    return learner, demo, stats


def stage1_sac_sim(policy: VLAPolicy, envs, demo_paths, cfg: SACConfig, *, episode_root: Path | None,
                   iteration: int, report: Progress = _noop, progress: bool = True, seed_start: int | None = None,
                   eval_fn=None, eval_every: int = 0, log_every: int = 512) -> dict:
    """Stage 1 in simulation: SACfD on the head with 50/50 demo/online batches.

    `eval_fn(policy) -> dict`, when given, runs after set-up and every `eval_every` env steps.
    """
    from .rollout import SACCollector

    learner, demo, stats = begin_stage1_sac(policy, demo_paths, cfg, report)
    tag = stats["latent_tag"]
    online = LatentReplay(min(cfg.buffer_bytes, max(cfg.total_env_steps, 1) * demo.bytes_per_transition),
                          demo.tokens, demo.width, demo.state.shape[1], demo.action.shape[1], tag)
    collector = SACCollector(envs, cfg, seed_start=seed_start, episode_root=episode_root, iteration=iteration)
    curve = [{"env_steps": 0, **eval_fn(policy)}] if eval_fn is not None else []
    history, budget, steps, last_log, last_eval = [], 0.0, 0, 0, 0
    total = max(cfg.total_env_steps, len(envs))
    bar = tqdm(total=total, desc="Stage 1 SAC", disable=not progress, mininterval=2.0)
    train_stats: dict = {}
    try:
        while steps < total:
            n = collector.step(policy, online, tag)
            steps += n
            bar.update(n)
            if online.added >= cfg.learning_starts:
                budget += cfg.utd * n
                k = int(budget)
                budget -= k
                train_stats = learner.train(online, demo, k) or train_stats
            if steps - last_log >= log_every or steps >= total:
                last_log = steps
                recent = collector.recent[-40:]
                entry = {"env_steps": steps, "episodes": collector.episodes_done,
                         "train_success_rate": float(np.mean([s for _, s in recent])) if recent else 0.0,
                         "critic_updates": learner.critic_updates, **train_stats}
                history.append(entry)
                bar.set_postfix(succ=f"{entry['train_success_rate']:.2f}", q=f"{train_stats.get('q_mean', 0):.2f}")
                nan = float("nan")
                report("stage1", steps / total,
                       f"{steps}/{total} steps, train success {entry['train_success_rate']:.2f}, "
                       f"Q {train_stats.get('q_mean', nan):.3f}, alpha {train_stats.get('alpha', nan):.4f}, "
                       f"bc {train_stats.get('bc_reg', nan):.3f}")
            if eval_fn is not None and eval_every and (steps - last_eval >= eval_every or steps >= total):
                last_eval = steps
                with learner.published_actor():  # the head a robot would run (the average, if any)
                    curve.append({"env_steps": steps, **eval_fn(policy)})
    finally:
        collector.close()  # its episode-writer child
    bar.close()
    learner.adopt_published()
    policy.eval()
    return {**stats, "updates": history, "episodes": collector.episodes_done, "successes": collector.successes,
            "saved_episodes": [str(p) for p in collector.saved], "episode_write_failures": collector.write_failures,
            "curve": curve, "critic_updates": learner.critic_updates, "actor_updates": learner.actor_updates}


def stage1_sac_offline(policy: VLAPolicy, demo_paths, online_paths, cfg: SACConfig, report: Progress = _noop) -> dict:
    """Stage 1 on the robot, offline: many SACfD updates over all policy episodes so far + demos.

    Latents are fp16 in bounded buffers (`sac.buffer_bytes`, `sac.demo_buffer_bytes`): when the
    policy episodes exceed the online budget, the oldest are dropped first.
    """
    learner, demo, stats = begin_stage1_sac(policy, demo_paths, cfg, report)
    online = encode_episodes(policy, list(online_paths), cfg, cfg.buffer_bytes, stats["latent_tag"], tokens=demo.tokens)
    report("stage1", 0.5, f"SACfD: {cfg.offline_updates} updates on {len(demo)} demo + {len(online)} policy transitions")
    chunks, done = [], 0
    while done < cfg.offline_updates:
        k = min(500, cfg.offline_updates - done)
        chunks.append(learner.train(online, demo, k))
        done += k
        report("stage1", 0.5 + 0.5 * done / max(cfg.offline_updates, 1), f"SACfD update {done}/{cfg.offline_updates}")
    learner.adopt_published()
    policy.eval()
    return {**stats, "episodes": len(online_paths), "online_transitions": len(online), "updates": chunks,
            "critic_updates": learner.critic_updates, "actor_updates": learner.actor_updates}
