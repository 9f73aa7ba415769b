"""Frozen-backbone PPO: GAE, the clipped loss, and that Stage 1 never touches the VLM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ire_vla_ros.training.config import PPOConfig
from ire_vla_ros.training.ppo import FrozenFeatureCache, compute_gae, make_ppo_optimizer, ppo_loss, ppo_update
from ire_vla_ros.training.stages import begin_stage1
from ire_vla_ros.vla.testing import make_tiny_policy


def _cache(T=3, N=1, rewards=None, dones=None, timeouts=None, values=None, last=0.0, tv=None):
    z = torch.zeros(T, N)
    return FrozenFeatureCache(
        hidden=torch.zeros(T, N, 2, 4), mask=torch.ones(T, N, 2, dtype=torch.bool), states=torch.zeros(T, N, 1),
        actions=torch.zeros(T, N, 1), log_probs=z.clone(), values=values if values is not None else z.clone(),
        rewards=rewards if rewards is not None else z.clone(), dones=dones if dones is not None else z.clone(),
        timeouts=timeouts if timeouts is not None else z.clone(),
        timeout_values=tv if tv is not None else z.clone(), last_values=torch.full((N,), last))


def test_gae_matches_hand_computation_with_termination():
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0], [0.0], [1.0]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    values = torch.tensor([[0.1], [0.2], [0.3]])
    b = _cache(rewards=rewards, dones=dones, values=values, last=5.0)  # last value ignored after done
    compute_gae(b, g, lam)
    d2 = 1.0 - 0.3
    d1 = 0.0 + g * 0.3 - 0.2
    d0 = 0.0 + g * 0.2 - 0.1
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(b.advantages[:, 0], torch.tensor([a0, a1, a2]))
    # Returns are the lambda-returns, worked out by hand for this episode (reward 1 at the end):
    # G2 = 1; G1 = 0 + g * ((1 - lam) * V2 + lam * G2); G0 = 0 + g * ((1 - lam) * V1 + lam * G1).
    G2 = 1.0
    G1 = g * ((1 - lam) * 0.3 + lam * G2)
    G0 = g * ((1 - lam) * 0.2 + lam * G1)
    torch.testing.assert_close(b.returns[:, 0], torch.tensor([G0, G1, G2]))


def test_gae_bootstraps_truncated_episodes():
    b = _cache(T=1, timeouts=torch.tensor([[1.0]]), tv=torch.tensor([[2.0]]), last=100.0)
    compute_gae(b, 0.5, 1.0)
    assert b.advantages.item() == pytest.approx(0.5 * 2.0)  # V(final obs), not the next episode's value


def test_ppo_loss_clips_the_ratio():
    cfg = PPOConfig(clip_coef=0.2, norm_adv=False, vf_coef=0.0, ent_coef=0.0)
    adv = torch.tensor([1.0])
    zero = torch.zeros(1)
    big = torch.tensor([np.log(2.0)])  # ratio 2 > 1.2: gradient must vanish for positive advantage
    new_lp = big.clone().requires_grad_(True)
    loss, stats = ppo_loss(new_lp, zero, adv, zero, zero, zero, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2)
    assert new_lp.grad.abs().item() == 0.0
    assert stats["clipfrac"] == 1.0


def _rollout_like(policy, T=8, N=4, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 255, (N, 64, 64, 3), dtype=np.uint8)
    st = rng.normal(size=(N, 9)).astype(np.float32)
    out = policy.act_batch(imgs, st, ["press the button from the top"] * N, deterministic=False)
    rep = lambda x: torch.as_tensor(x).unsqueeze(0).repeat(T, *([1] * torch.as_tensor(x).dim()))
    b = FrozenFeatureCache(
        hidden=rep(out.hidden), mask=rep(out.mask.bool()), states=rep(policy.normalize_state(st)),
        actions=rep(out.normalized), log_probs=rep(out.log_probs), values=rep(out.values),
        rewards=torch.tensor(rng.random((T, N)) > 0.7, dtype=torch.float32), dones=torch.zeros(T, N),
        timeouts=torch.zeros(T, N), timeout_values=torch.zeros(T, N), last_values=torch.zeros(N),
        images=np.repeat(imgs[None], T, 0), instructions=[["press the button from the top"] * N] * T)
    compute_gae(b, 0.99, 0.95)
    return b


def test_stage1_update_changes_the_head_but_never_the_backbone():
    policy = make_tiny_policy()
    cfg = PPOConfig(update_epochs=2, minibatch_size=16, target_kl=None)
    opt = begin_stage1(policy, cfg)
    batch = _rollout_like(policy)
    before_bb = {n: p.detach().clone() for n, p in policy.backbone.named_parameters()}
    before_head = {n: p.detach().clone() for n, p in policy.actor.named_parameters()}
    stats = ppo_update(policy, opt, batch, cfg)
    assert stats["epochs"] == 2
    for n, p in policy.backbone.named_parameters():
        assert torch.equal(p, before_bb[n]), f"backbone parameter {n} changed in Stage 1"
    assert any(not torch.equal(p, before_head[n]) for n, p in policy.actor.named_parameters())
    assert not any(p.grad is not None for p in policy.backbone.parameters())


def test_full_model_ablation_updates_lora():
    policy = make_tiny_policy()
    cfg = PPOConfig(update_epochs=1, minibatch_size=16, target_kl=None, freeze_backbone=False)
    opt = begin_stage1(policy, cfg)
    opt = make_ppo_optimizer(policy, cfg)
    batch = _rollout_like(policy)
    before = [p.detach().clone() for p in policy.lora_parameters()]
    ppo_update(policy, opt, batch, cfg)
    assert any(not torch.equal(p, b) for p, b in zip(policy.lora_parameters(), before))


def test_cached_features_equal_a_fresh_backbone_pass():
    """The point of the cache: with the VLM frozen, re-running it would give the same numbers."""
    policy = make_tiny_policy()
    begin_stage1(policy, PPOConfig())
    batch = _rollout_like(policy, T=1)
    fresh, _ = policy.encode(batch.images[0], batch.instructions[0])
    torch.testing.assert_close(batch.hidden[0], fresh)


def test_target_kl_stops_epochs_early():
    policy = make_tiny_policy()
    cfg = PPOConfig(update_epochs=5, minibatch_size=8, target_kl=1e-9, lr_actor=1e-2)
    opt = begin_stage1(policy, cfg)
    batch = _rollout_like(policy)
    stats = ppo_update(policy, opt, batch, cfg)
    assert stats["epochs"] == 1 and stats["approx_kl"] > 1e-9  # the first epoch moved the policy past the limit
    # Positive control: without a KL limit the same update runs every epoch.
    policy = make_tiny_policy()
    cfg = PPOConfig(update_epochs=5, minibatch_size=8, target_kl=None, lr_actor=1e-2)
    assert ppo_update(policy, begin_stage1(policy, cfg), _rollout_like(policy), cfg)["epochs"] == 5


def test_begin_stage1_resets_critic_and_exploration_noise():
    policy = make_tiny_policy()
    with torch.no_grad():
        for p in policy.critic.parameters():
            p.fill_(0.123)
    begin_stage1(policy, PPOConfig(init_log_std=-0.5, seed=3))
    # The critic is a fresh initialisation (the one seed 3 gives), not the old weights.
    from ire_vla_ros.vla.heads import CriticHead

    torch.manual_seed(3)
    fresh = CriticHead(policy.backbone.hidden_size, len(policy.joint_names), policy.cfg.head_width, policy.cfg.head_queries)
    for (name, p), q in zip(policy.critic.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert torch.allclose(policy.actor.log_std, torch.full_like(policy.actor.log_std, -0.5))


def test_log_prob_of_a_clipped_action_is_the_tail_mass():
    """A sample beyond the action bound executes as the bound: its likelihood is the tail mass,
    and moving the mean further out of bounds changes it only through that mass."""
    from ire_vla_ros.vla.action_spec import ActionSpec

    spec = ActionSpec(names=("x",), low=(-1.0,), high=(1.0,))
    policy = make_tiny_policy(action_spec=spec)
    policy.set_normalization([0.0], [1.0], np.zeros(9), np.ones(9))
    mean = torch.tensor([[0.5]], requires_grad=True)
    dist = torch.distributions.Normal(mean, torch.tensor([[0.5]]))
    lp_out = policy.log_prob(dist, torch.tensor([[1.7]]))  # beyond +1: executes as +1
    expected = torch.log(1 - torch.distributions.Normal(0.5, 0.5).cdf(torch.tensor(1.0)))
    torch.testing.assert_close(lp_out, expected.reshape(1), atol=1e-5, rtol=1e-5)
    lp_in = policy.log_prob(dist, torch.tensor([[0.2]]))
    torch.testing.assert_close(lp_in, dist.log_prob(torch.tensor([[0.2]])).sum(-1))
    # Two samples beyond the bound are the same executed action: same likelihood.
    torch.testing.assert_close(policy.log_prob(dist, torch.tensor([[3.0]])), lp_out)


def test_success_bonus_makes_finishing_worth_more_than_hovering():
    """Episodes end on success: with dense reward the success step must be worth at least holding
    the best step reward forever, or PPO learns not to finish (seen on button-press)."""
    from ire_vla_ros.training.config import success_bonus

    sparse, dense = PPOConfig(reward="sparse"), PPOConfig(reward="dense", dense_reward_scale=0.1, gamma=0.99)
    assert success_bonus(sparse) == 1.0
    best_step = 10.0 * dense.dense_reward_scale
    hover_return = sum(best_step * dense.gamma ** k for k in range(10_000))
    assert success_bonus(dense) >= hover_return - 1e-6
    assert success_bonus(PPOConfig(success_bonus=3.0)) == 3.0


def test_offline_ppo_cache_reads_episodes_one_by_one_into_fp16_latents(tmp_path):
    """PPO from recorded robot episodes (stage1.algo: ppo): latents stored in fp16, one column per
    episode padded after its end (done from its last step on), the same features as a fresh pass,
    and the PPO update runs on them."""
    from ire_vla_ros.episodes.store import EpisodeWriter
    from ire_vla_ros.training.stages import cache_from_episodes, stage1_ppo_offline
    from ire_vla_ros.vla.action_spec import METAWORLD_4D
    from ire_vla_ros.vla.testing import SAWYER_JOINTS

    policy = make_tiny_policy()
    rng = np.random.default_rng(0)
    paths, frames = [], []
    for n_steps in (5, 3):
        w = EpisodeWriter(tmp_path, instruction="press the button from the top", task="b", source="policy",
                          action_spec=METAWORLD_4D, joint_names=SAWYER_JOINTS)
        imgs = rng.integers(0, 256, (n_steps, 64, 64, 3), dtype=np.uint8)
        for t in range(n_steps):
            w.append(images={"main": imgs[t]}, joint_positions=rng.normal(size=9).astype(np.float32),
                     action=rng.uniform(-1, 1, 4).astype(np.float32), reward=float(t == n_steps - 1),
                     timestamp=0.1 * t, log_prob=-1.0, value=0.0)
        paths.append(w.finalize(True))
        frames.append(imgs)
    cfg = PPOConfig(minibatch_size=4, update_epochs=1, critic_warmup_rollouts=0)
    batch = cache_from_episodes(policy, paths, cfg)
    assert batch.hidden.dtype == torch.float16 and batch.hidden.shape[:2] == (5, 2)
    assert batch.dones[:, 1].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and batch.dones[:, 0].tolist() == [0, 0, 0, 0, 1]
    with torch.no_grad():
        fresh, _ = policy.encode(frames[1], ["press the button from the top"] * 3)
    torch.testing.assert_close(batch.hidden[:3, 1, : fresh.shape[1]].float(), fresh, atol=2e-3, rtol=2e-3)
    assert torch.isfinite(batch.log_probs).all()
    stats = stage1_ppo_offline(policy, paths, cfg)
    assert stats["episodes"] == 2
