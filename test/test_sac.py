"""SACfD on cached latents: squashed log-prob, replay accounting and tags, terminal masks, the
critic ensemble, the losses, and a short real run in MuJoCo."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ire_vla_ros.training.sac import (
    CriticEnsemble, LatentReplay, SACConfig, SACLearner, StaleLatents, add_episode, backbone_tag,
    bytes_per_transition, critic_loss, distill_to_tanh, sample_mixed, temperature_loss, unit_action,
)
from ire_vla_ros.vla.action_spec import ActionSpec
from ire_vla_ros.vla.policy import squashed_log_prob
from ire_vla_ros.vla.testing import make_tiny_policy

INSTR = "press the button from the top"


# ----------------------------------------------------------------------------- squashed Gaussian
def test_squashed_log_prob_is_the_change_of_variables_density():
    """1-D: y = tanh(u), u ~ N(m, s) has density N(atanh y; m, s) / (1 - y^2); it integrates to 1
    over (-1, 1), and a histogram of samples follows it."""
    m, s = 0.7, 0.8
    dist = torch.distributions.Normal(torch.tensor([m], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
    y = torch.linspace(-0.999, 0.999, 4001, dtype=torch.float64)
    u = torch.atanh(y)
    analytic = torch.distributions.Normal(m, s).log_prob(u) - torch.log1p(-y ** 2)
    ours = squashed_log_prob(dist, u.unsqueeze(-1))
    torch.testing.assert_close(ours, analytic, atol=1e-6, rtol=1e-6)
    mass = torch.trapezoid(ours.exp(), y).item()
    assert mass == pytest.approx(1.0, abs=2e-3)
    samples = torch.tanh(dist.sample((200_000,)).squeeze(-1))
    hist, edges = np.histogram(samples.numpy(), bins=20, range=(-1, 1), density=True)
    centres = torch.tensor((edges[:-1] + edges[1:]) / 2)
    density = squashed_log_prob(dist, torch.atanh(centres).unsqueeze(-1)).exp().numpy()
    inner = slice(2, 18)  # the outer bins hold the steep edges of the density
    np.testing.assert_allclose(hist[inner], density[inner], rtol=0.08)


def test_tanh_policy_log_prob_round_trips_and_stays_finite_when_saturated():
    policy = make_tiny_policy(action_squash="tanh")
    low, high = policy.normalized_bounds()
    dist = torch.distributions.Normal(torch.tensor([[0.3, -0.2, 5.0, 0.0]]), torch.full((1, 4), 0.5))
    a_n, logp = policy.squashed_sample(dist)
    assert torch.all(a_n >= low) and torch.all(a_n <= high)
    torch.testing.assert_close(policy.log_prob(dist, a_n), logp, atol=1e-3, rtol=1e-3)
    far = squashed_log_prob(dist, torch.tensor([[0.0, 0.0, 30.0, 0.0]]))
    assert torch.isfinite(far).all()


def test_stage2_mse_fits_the_median_of_the_squashed_policy_and_leaves_its_noise():
    """SFT's MSE is on `deterministic_action` = c + h * tanh(mean): the per-dimension median of the
    squashed distribution (tanh is monotone). It gives the exploration noise no gradient."""
    from ire_vla_ros.training.sft import sft_loss

    policy = make_tiny_policy(action_squash="tanh")
    dist = torch.distributions.Normal(torch.tensor([[0.4, -1.2, 0.0, 2.0]]), torch.full((1, 4), 0.6))
    samples = torch.stack([policy.squashed_sample(dist)[0] for _ in range(20_000)]).squeeze(1)
    torch.testing.assert_close(samples.median(0).values, policy.deterministic_action(dist.mean)[0], atol=0.02, rtol=0)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    policy.unfreeze_lora()
    loss = sft_loss(policy, imgs, rng.normal(size=(4, 9)).astype(np.float32),
                    rng.uniform(-1, 1, (4, 4)).astype(np.float32), [INSTR] * 4)
    loss.backward()
    assert policy.actor.log_std.grad is None
    assert policy.actor.mlp[-1].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- replay
def test_bytes_per_transition_matches_what_the_buffer_allocates():
    policy = make_tiny_policy()
    with torch.no_grad():
        hidden, _ = policy.encode(np.zeros((1, 64, 64, 3), np.uint8), [INSTR])
    tokens, width = hidden.shape[1], hidden.shape[2]
    assert (tokens, width) == (24, 64)  # tiny preset: 8 query + 16 text tokens, d = 64
    assert bytes_per_transition(tokens, width, 9, 4) == 6312
    # BLIP-2 OPT-2.7B-sized latent: 32 query + 16 text tokens, d = 2560 (7 joints, 7-D action).
    assert bytes_per_transition(48, 2560, 7, 7) == 491_744
    for args in ((24, 64, 9, 4), (48, 2560, 7, 7)):
        bpt = bytes_per_transition(*args)
        replay = LatentReplay(3 * bpt + bpt // 2, *args, tag="t")
        assert replay.capacity == 3 and replay.nbytes() == 3 * bpt


def _transitions(B, tokens=6, width=8, S=3, A=2, seed=0, reward=0.0, done=0.0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden=torch.randn(B, tokens, width, generator=g), mask=torch.ones(B, tokens, dtype=torch.bool),
                state=torch.randn(B, S, generator=g), action=torch.randn(B, A, generator=g),
                behaviour_action=torch.zeros(B, A), reward=torch.full((B,), reward), done=torch.full((B,), done),
                next_hidden=torch.randn(B, tokens, width, generator=g), next_mask=torch.ones(B, tokens, dtype=torch.bool),
                next_state=torch.randn(B, S, generator=g))


def test_replay_is_a_bounded_ring_with_fp16_latents_and_checks_the_tag():
    replay = LatentReplay(5 * bytes_per_transition(6, 8, 3, 2), 6, 8, 3, 2, tag="ckpt-a")
    first = _transitions(3, seed=1)
    replay.add(**first, tag="ckpt-a")
    replay.add(**_transitions(3, seed=2, reward=1.0), tag="ckpt-a")
    assert len(replay) == 5 and replay.added == 6
    assert replay.hidden.dtype == torch.float16
    # The oldest transition was overwritten by the newest; the others are intact.
    assert replay.reward[0].item() == 1.0 and replay.reward[1].item() == 0.0
    torch.testing.assert_close(replay.hidden[1].float(), first["hidden"][1].half().float())
    with pytest.raises(StaleLatents, match="ckpt-b"):
        replay.add(**_transitions(1), tag="ckpt-b")
    replay.clear("ckpt-b")
    replay.add(**_transitions(1), tag="ckpt-b")
    assert len(replay) == 1


def test_backbone_tag_changes_when_lora_changes():
    policy = make_tiny_policy()
    before = backbone_tag(policy)
    assert backbone_tag(policy) == before
    with torch.no_grad():
        policy.actor.mlp[-1].bias.add_(1.0)  # the head does not change the latents
    assert backbone_tag(policy) == before
    with torch.no_grad():
        policy.lora_parameters()[0].add_(0.01)  # Stage 2 moved LoRA: the latents are stale
    assert backbone_tag(policy) != before


def test_mixed_batches_take_the_configured_demo_share():
    online = LatentReplay(1 << 20, 6, 8, 3, 2, tag="t")
    demo = LatentReplay(1 << 20, 6, 8, 3, 2, tag="t")
    online.add(**_transitions(10, reward=0.0), tag="t")
    demo.add(**_transitions(10, reward=1.0), tag="t")
    gen = torch.Generator().manual_seed(0)
    for frac, n_demo in ((0.5, 128), (0.25, 64)):
        b = sample_mixed(online, demo, 256, frac, gen, "cpu")
        assert int(b["is_demo"].sum()) == n_demo
        assert torch.equal(b["reward"], b["is_demo"].float())  # the flag says where each row came from
    assert bool(sample_mixed(None, demo, 8, 0.5, gen, "cpu")["is_demo"].all())


def test_trimming_trailing_padding_leaves_the_pooled_features_unchanged():
    from ire_vla_ros.training.sac import trim_padding
    from ire_vla_ros.vla.heads import TokenLearner

    torch.manual_seed(0)
    pool = TokenLearner(64, 32, 4)
    hidden, next_hidden = torch.randn(6, 24, 64), torch.randn(6, 24, 64)
    mask = torch.zeros(6, 24, dtype=torch.bool)
    mask[:, :15] = True  # the tiny preset: 8 query + 7 instruction tokens, then padding
    next_mask = mask.clone()
    next_mask[2, 17] = True  # one row uses a later position: kept for all rows
    batch = trim_padding({"hidden": hidden, "next_hidden": next_hidden, "mask": mask, "next_mask": next_mask})
    assert batch["hidden"].shape[1] == batch["next_mask"].shape[1] == 18
    with torch.no_grad():
        torch.testing.assert_close(pool(batch["hidden"], batch["mask"]), pool(hidden, mask))
        torch.testing.assert_close(pool(batch["next_hidden"], batch["next_mask"]), pool(next_hidden, next_mask))


# ----------------------------------------------------------------------------- terminal masks
def _episode_on_disk(tmp_path, policy, steps, success):
    from ire_vla_ros.episodes.store import EpisodeWriter, read_episode
    from ire_vla_ros.vla.action_spec import METAWORLD_4D
    from ire_vla_ros.vla.testing import SAWYER_JOINTS

    rng = np.random.default_rng(steps)
    w = EpisodeWriter(tmp_path, instruction=INSTR, task="button-press-topdown-v3", source="teleop",
                      action_spec=METAWORLD_4D, joint_names=SAWYER_JOINTS)
    for t in range(steps):
        w.append(images={"main": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                 joint_positions=rng.normal(size=9).astype(np.float32),
                 action=rng.uniform(-1, 1, 4).astype(np.float32), reward=5.0, timestamp=0.1 * t)
    return read_episode(w.finalize(success))


def test_recorded_episodes_end_in_a_terminal_only_on_success(tmp_path):
    """hil-serl#49: only a success is terminal. A time-limited (failed) episode has no recorded
    frame after its last step, so that step is dropped rather than marked done."""
    policy = make_tiny_policy()
    cfg = SACConfig(gamma=0.9)
    ok = _episode_on_disk(tmp_path, policy, 4, success=True)
    failed = _episode_on_disk(tmp_path, policy, 5, success=False)
    replay = LatentReplay(1 << 22, 24, 64, 9, 4, tag=backbone_tag(policy))
    assert add_episode(replay, policy, ok, cfg, replay.tag) == 4
    assert replay.done[:4].tolist() == [0, 0, 0, 1] and replay.reward[:4].tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(replay.mc_return[:4], torch.tensor([0.729, 0.81, 0.9, 1.0]))
    # next latent of step t is the latent of step t + 1
    torch.testing.assert_close(replay.next_hidden[1], replay.hidden[2])
    assert add_episode(replay, policy, failed, cfg, replay.tag) == 4
    assert replay.done[4:8].tolist() == [0, 0, 0, 0] and replay.reward[4:8].sum() == 0
    with pytest.raises(StaleLatents):
        add_episode(replay, policy, ok, cfg, "another-checkpoint")


def _learner(num_critics=4, **kw):
    spec = ActionSpec(names=("x", "y"), low=(-1.0, -1.0), high=(1.0, 1.0))
    policy = make_tiny_policy(action_spec=spec, action_squash="tanh")
    cfg = SACConfig(num_critics=num_critics, critic_hidden=32, batch_size=8, **kw)
    return SACLearner(policy, cfg)


def _batch(learner, B=8, reward=0.0, done=0.0, is_demo=False, mc=-math.inf):
    t = _transitions(B, tokens=24, width=64, S=9, A=2, reward=reward, done=done)
    t["is_demo"] = torch.full((B,), is_demo)
    t["mc_return"] = torch.full((B,), mc)
    t["success"] = torch.zeros(B)
    return t


def test_td_target_bootstraps_truncation_but_not_success():
    learner = _learner(gamma=0.9, mc_lower_bound=False)
    _, done_stats = critic_loss(learner, _batch(learner, reward=1.0, done=1.0), learner.cfg)
    assert done_stats["td_target_mean"] == pytest.approx(1.0)  # success: r, nothing after
    with torch.no_grad():
        learner.target_critic.net[-1].bias.fill_(3.0)  # every target member now predicts ~3 more
    _, trunc_stats = critic_loss(learner, _batch(learner, reward=0.0, done=0.0), learner.cfg)
    assert trunc_stats["td_target_mean"] > 2.0  # truncated/ongoing: r + gamma * Q(s', a')


def test_monte_carlo_return_floors_targets_where_it_is_known():
    learner = _learner(gamma=0.9, mc_lower_bound=True)
    with torch.no_grad():
        learner.target_critic.net[-1].bias.fill_(-5.0)
    _, demo = critic_loss(learner, _batch(learner, is_demo=True, mc=0.7), learner.cfg)
    _, finished = critic_loss(learner, _batch(learner, is_demo=False, mc=0.5), learner.cfg)
    _, running = critic_loss(learner, _batch(learner, is_demo=False), learner.cfg)  # episode not over: -inf
    assert demo["td_target_mean"] == pytest.approx(0.7)
    assert finished["td_target_mean"] == pytest.approx(0.5)
    assert running["td_target_mean"] < -2.0


def test_self_imitation_regularises_only_demo_rows_and_online_successes():
    from ire_vla_ros.training.sac import actor_loss

    learner = _learner(online_bc="success")
    failed = _batch(learner)
    _, _, s_failed = actor_loss(learner, failed, learner.cfg, bc_weight=1.0)
    assert s_failed["bc_reg"] == 0.0  # online rows of failed/unfinished episodes: Q term only
    won = _batch(learner)
    won["success"] = torch.ones(8)
    _, _, s_won = actor_loss(learner, won, learner.cfg, bc_weight=1.0)
    assert s_won["bc_reg"] > 0.0
    _, _, s_demo = actor_loss(learner, _batch(learner, is_demo=True), learner.cfg, bc_weight=1.0)
    assert s_demo["bc_reg"] == pytest.approx(s_won["bc_reg"])  # same rows, same actions: same pull
    trust = _learner(online_bc="behaviour")
    _, _, s_trust = actor_loss(trust, _batch(trust), trust.cfg, bc_weight=1.0)
    assert s_trust["bc_reg"] > 0.0  # toward the collecting policy's action (zeros here)


def test_awac_imitates_the_buffer_actions_the_critic_prefers():
    """Same states, two stored actions (+0.5 and -0.5); the critic prefers +0.5. Plain BC would
    settle in the middle; AWAC's advantage weights pull the policy's action to +0.5."""
    from ire_vla_ros.training.sac import awac_actor_loss

    learner = _learner(actor_objective="awac", awac_beta=0.05)
    batch = _batch(learner, B=16)
    batch["hidden"], batch["state"] = batch["hidden"][:1].repeat(16, 1, 1), batch["state"][:1].repeat(16, 1)
    batch["action"] = torch.tensor([[0.5, 0.5]] * 8 + [[-0.5, -0.5]] * 8)
    good = torch.tensor([0.5, 0.5])
    learner.critic.q = lambda pooled, state, action: -(action - good).pow(2).sum(-1).expand(4, -1)
    opt = torch.optim.Adam(learner.policy.head_parameters(), lr=3e-3)
    for _ in range(150):
        loss, _, stats = awac_actor_loss(learner, batch, learner.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        det = learner.policy.deterministic_action(learner.policy.actor(batch["hidden"][:1], batch["mask"][:1], batch["state"][:1]))
    assert torch.all(det[0] > 0.3), det  # plain BC: ~0.0
    assert learner.policy.actor.log_std.grad is None  # AWAC leaves the exploration noise alone


def test_critic_members_are_independent_with_their_own_output_layers():
    critic = CriticEnsemble(64, 9, 4, width=32, num_queries=2, members=10, hidden=16)
    out_layer = critic.net[-1]
    assert out_layer.weight.shape == (10, 16, 1)
    q = critic(torch.randn(5, 24, 64), torch.ones(5, 24, dtype=torch.bool), torch.randn(5, 9), torch.randn(5, 4))
    assert q.shape == (10, 5)
    assert q.std(0).min() > 1e-4  # members disagree: different initialisations, no shared output


def _member_by_member(critic, hidden, mask, state, action):
    """The ensemble written out the slow way: each member's own MLP on the shared pooled latent."""
    x = torch.cat([critic.pool(hidden, mask), state, action], dim=-1)
    l1, n1, _, l2, n2, _, l3 = critic.net
    out = []
    for e in range(critic.members):
        h = torch.relu(nn.functional.layer_norm(x @ l1.weight[e] + l1.bias[e], (l1.weight.shape[2],)) * n1.weight[e] + n1.bias[e])
        h = torch.relu(nn.functional.layer_norm(h @ l2.weight[e] + l2.bias[e], (l2.weight.shape[2],)) * n2.weight[e] + n2.bias[e])
        out.append((h @ l3.weight[e] + l3.bias[e]).squeeze(-1))
    return torch.stack(out)


def test_vectorized_ensemble_equals_member_by_member_in_value_and_gradient():
    """One GEMM for all members' first layer, batched matmuls after it, and a member subset for the
    TD target: the same Q values and weight gradients as running each member on its own."""
    torch.manual_seed(0)
    critic = CriticEnsemble(64, 9, 4, width=32, num_queries=2, members=5, hidden=16)
    args = (torch.randn(7, 24, 64), torch.ones(7, 24, dtype=torch.bool), torch.randn(7, 9), torch.randn(7, 4))
    q = critic(*args)
    slow = _member_by_member(critic, *args)
    torch.testing.assert_close(q, slow, atol=1e-5, rtol=1e-5)
    members = torch.tensor([3, 1])
    torch.testing.assert_close(critic(*args, members=members), slow[members], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(q.pow(2).sum(), list(critic.parameters()))
    slow_grads = torch.autograd.grad(_member_by_member(critic, *args).pow(2).sum(), list(critic.parameters()))
    for g, s in zip(grads, slow_grads):
        torch.testing.assert_close(g, s, atol=1e-4, rtol=1e-4)


def test_td_target_is_the_min_over_two_sampled_target_members():
    learner = _learner(num_critics=6, mc_lower_bound=False, gamma=0.5)
    with torch.no_grad():
        learner.target_critic.net[-1].bias.copy_(torch.arange(6.0).view(6, 1, 1) * 10.0)  # members far apart
        learner.target_critic.net[-1].weight.zero_()
    # target = 0.5 * min of 2 random members of {0, 10, ..., 50}: one of 0, 5, ..., 20 (50 is never a
    # min of two), and not always 0 (the min over all members)
    values = {critic_loss(learner, _batch(learner), learner.cfg)[1]["td_target_mean"] for _ in range(20)}
    assert values <= {0.0, 5.0, 10.0, 15.0, 20.0} and len(values) > 1


def test_actor_loss_gives_no_gradient_to_the_critic():
    from ire_vla_ros.training.sac import actor_loss

    learner = _learner()
    loss, _, _ = actor_loss(learner, _batch(learner, is_demo=True), learner.cfg, bc_weight=0.5)
    loss.backward()
    assert all(p.grad is None for p in learner.critic.parameters())  # the Q term only moves the action
    assert learner.policy.actor.mlp[-1].weight.grad.abs().sum() > 0
    assert all(p.requires_grad for p in learner.critic.parameters())  # the critic trains on afterwards


def test_temperature_rises_when_entropy_is_below_target():
    log_alpha = torch.tensor(0.0, requires_grad=True)
    temperature_loss(log_alpha, torch.full((8,), 3.0), target_entropy=-2.0).backward()  # entropy -3 < -2
    assert log_alpha.grad.item() < 0  # gradient descent raises alpha
    log_alpha.grad = None
    temperature_loss(log_alpha, torch.full((8,), -5.0), target_entropy=-2.0).backward()
    assert log_alpha.grad.item() > 0


def test_updates_move_the_head_and_critic_but_never_the_backbone():
    learner = _learner()
    policy = learner.policy
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2, reward=1.0, done=1.0), tag="t")
    bb = {n: p.detach().clone() for n, p in policy.backbone.named_parameters()}
    head = [p.detach().clone() for p in policy.head_parameters()]
    target = [p.detach().clone() for p in learner.target_critic.parameters()]
    stats = learner.train(replay, replay, 4)
    assert learner.critic_updates == 4 and learner.actor_updates == 2  # critic:actor = 2
    assert {"critic_loss", "actor_loss", "alpha", "q_pi"} <= set(stats)
    for n, p in policy.backbone.named_parameters():
        assert torch.equal(p, bb[n]), n
    assert any(not torch.equal(p, h) for p, h in zip(policy.head_parameters(), head))
    assert any(not torch.equal(p, t) for p, t in zip(learner.target_critic.parameters(), target))


def test_actor_waits_for_online_transitions_while_the_critic_trains():
    learner = _learner(actor_learning_starts=40)
    demo, online = (LatentReplay(1 << 22, 24, 64, 9, 2, tag="t") for _ in range(2))
    demo.add(**_transitions(32, tokens=24, width=64, S=9, A=2), tag="t")
    online.add(**_transitions(32, tokens=24, width=64, S=9, A=2, seed=1), tag="t")
    head = [p.detach().clone() for p in learner.policy.head_parameters()]
    learner.train(online, demo, 4)
    assert (learner.critic_updates, learner.actor_updates) == (4, 0)  # 32 online < 40: critic only
    assert all(torch.equal(p, h) for p, h in zip(learner.policy.head_parameters(), head))
    online.add(**_transitions(8, tokens=24, width=64, S=9, A=2, seed=2), tag="t")
    learner.train(online, demo, 4)
    assert (learner.critic_updates, learner.actor_updates) == (8, 2)


def test_exploration_noise_stays_under_max_log_std():
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2), tag="t")
    for cap, expect_capped in ((-1.0, True), (None, False)):
        learner = _learner(max_log_std=cap, lr_actor=0.5)  # a big step: the entropy term raises the noise
        learner.log_alpha.data.fill_(math.log(10.0))
        learner.train(replay, replay, 2)
        log_std = learner.policy.actor.log_std
        assert (log_std.max().item() <= -1.0) == expect_capped, log_std


def _log_std_grad(learner, batch, alpha: float) -> torch.Tensor:
    """d(actor loss, no behaviour term)/d(log std) at temperature alpha, one seeded noise draw."""
    from ire_vla_ros.training.sac import actor_loss

    learner.log_alpha.data.fill_(math.log(alpha))
    learner.policy.actor.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _, _ = actor_loss(learner, batch, learner.cfg, bc_weight=0.0)
    loss.backward()
    return learner.policy.actor.log_std.grad.clone()


def test_near_a_bound_only_the_entropy_term_moves_the_noise():
    """Why sac.max_log_std defaults to the initial noise: with the mean action near a bound (the
    expert's saturated actions, pre-squash ~3) the Q term hardly changes with the noise (tanh' ~0.01
    there), while the entropy term raises it at every step; unbounded it drifted ~+1 per 8k
    decisions in the benchmark (sac.py docstring)."""
    q_grads = {}
    for mean in (0.0, 3.0):
        learner = _learner(max_log_std=None)
        with torch.no_grad():  # the head outputs `mean` (pre-squash) whatever the latent
            learner.policy.actor.mlp[-1].weight.zero_()
            learner.policy.actor.mlp[-1].bias.fill_(mean)
            learner.critic.net[-1].weight.mul_(30.0)  # a critic with a clear slope in the action
        batch = _batch(learner, B=64)
        q_grads[mean] = _log_std_grad(learner, batch, alpha=1e-12)  # the Q term alone
        if mean == 3.0:
            both = _log_std_grad(learner, batch, alpha=0.01)
            assert (both < 0).all()  # descending it raises the noise
    assert q_grads[0.0].abs().mean() > 20 * q_grads[3.0].abs().mean(), q_grads
    assert SACConfig().max_log_std == SACConfig().init_log_std
    with pytest.raises(ValueError, match="init_log_std -0.5 is above sac.max_log_std -1.0"):
        _learner(init_log_std=-0.5)


def test_published_actor_is_the_running_average_and_training_resumes_unchanged():
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2), tag="t")
    learner = _learner(head_average_tau=0.25, lr_actor=0.05)
    params = list(learner.policy.actor.parameters())
    expected = [p.detach().clone() for p in params]
    for _ in range(3):  # one actor update per 2 critic updates: avg += tau * (actor - avg) after each
        learner.train(replay, replay, 2)
        expected = [e + 0.25 * (p.detach() - e) for e, p in zip(expected, params)]
    trained = [p.detach().clone() for p in params]
    assert any(not torch.allclose(t, e) for t, e in zip(trained, expected))
    with learner.published_actor():
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e)
    for p, t in zip(params, trained):
        assert torch.equal(p.detach(), t)  # the learner keeps training the actor, not the average
    off = _learner()
    with off.published_actor():
        pass
    assert off.actor_average is None
    learner.adopt_published()  # the end of a Stage 1 that averages: the result is the published head
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)
    before = [p.detach().clone() for p in off.policy.actor.parameters()]
    off.adopt_published()  # no average: nothing changes
    assert all(torch.equal(p.detach(), b) for p, b in zip(off.policy.actor.parameters(), before))


def test_critic_dropout_regularises_training_only_in_the_members():
    learner = _learner(critic_dropout=0.5)  # large, so one pass shows it
    critic = learner.critic
    assert sum(isinstance(m, torch.nn.Dropout) for m in critic.net) == 2  # after each hidden linear (DroQ)
    assert not any(isinstance(m, torch.nn.Dropout) for m in _learner().critic.net)  # 0: none at all
    batch = _batch(learner)
    pooled = critic.pool(batch["hidden"], batch["mask"])
    action = unit_action(learner.policy, batch["action"])
    torch.manual_seed(1)
    a = critic.q(pooled, batch["state"], action)
    b = critic.q(pooled, batch["state"], action)
    assert not torch.allclose(a, b)  # stochastic while training, as in the TD target and the actor term
    critic.eval()
    torch.testing.assert_close(critic.q(pooled, batch["state"], action), critic.q(pooled, batch["state"], action))
    critic.train()
    stats = learner.update(batch)
    assert math.isfinite(stats["critic_loss"]) and math.isfinite(stats["actor_loss"])


def test_frozen_actor_pool_stays_as_stage0_left_it():
    learner = _learner(actor_train_pool=False)
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2, reward=1.0, done=1.0), tag="t")
    actor = learner.policy.actor
    pool = [p.detach().clone() for p in actor.pool.parameters()]
    mlp = [p.detach().clone() for p in actor.mlp.parameters()]
    learner.train(replay, replay, 6)
    assert all(torch.equal(p, q) for p, q in zip(actor.pool.parameters(), pool))
    assert any(not torch.equal(p, q) for p, q in zip(actor.mlp.parameters(), mlp))
    assert all(p.grad is None for p in actor.pool.parameters())  # no backward through it at all
    learner.policy.unfreeze_lora()  # Stage 2 trains the whole head again
    assert all(p.requires_grad for p in actor.parameters())


def test_frozen_critic_pool_keeps_the_actors_pooling_and_trains_the_members():
    learner = _learner(critic_train_pool=False)
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2, reward=1.0, done=1.0), tag="t")
    critic = learner.critic
    pool = [p.detach().clone() for p in critic.pool.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(pool, learner.policy.actor.pool.parameters()))  # "actor" init
    members = [p.detach().clone() for n, p in critic.named_parameters() if not n.startswith("pool.")]
    learner.train(replay, replay, 6)
    assert all(torch.equal(p, q) for p, q in zip(critic.pool.parameters(), pool))
    assert any(not torch.equal(p.detach(), q) for p, q in
               zip((p for n, p in critic.named_parameters() if not n.startswith("pool.")), members))
    assert all(p.grad is None for p in critic.pool.parameters())


def test_distilled_tanh_head_acts_like_the_clip_head():
    policy = make_tiny_policy()
    with torch.no_grad():  # a head whose actions reach past the bounds, as Metaworld experts' do
        policy.actor.mlp[-1].weight.mul_(30.0)
        policy.actor.mlp[-1].bias.copy_(torch.tensor([0.3, -0.5, 4.0, 0.0]))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
    states = rng.normal(size=(64, 9)).astype(np.float32)
    with torch.no_grad():
        h, m = policy.encode(imgs, [INSTR] * 64)
        s_n = policy.normalize_state(states)
        low, high = policy.normalized_bounds()
        clip_actions = torch.maximum(torch.minimum(policy.actor(h, m, s_n), high), low)
    replay = LatentReplay(1 << 22, 24, 64, 9, 4, tag="t")
    replay.add(hidden=h, mask=m, state=s_n, action=clip_actions, behaviour_action=clip_actions,
               reward=torch.zeros(64), done=torch.zeros(64), next_hidden=h, next_mask=m, next_state=s_n, tag="t")
    before = (policy.deterministic_action(policy.actor(h, m, s_n)) - clip_actions).abs().mean().item()
    stats = distill_to_tanh(policy, [replay], steps=200, batch_size=64)
    assert policy.cfg.action_squash == "tanh"
    with torch.no_grad():
        after = (policy.deterministic_action(policy.actor(h, m, s_n)) - clip_actions).abs().mean().item()
    assert stats["distill_loss_last"] < stats["distill_loss_first"]
    assert after < 0.05 * (high - low).mean().item() and after < before


# ----------------------------------------------------------------------------- real run
def test_sac_stage1_in_metaworld_collects_stores_and_updates(tmp_path):
    """Real MuJoCo, real demos, a few real SAC updates: the pieces work together, truncated
    transitions are not terminal, and successful episodes are written for Stage 2."""
    from ire_vla_ros.sim.collect import collect_expert_episodes
    from ire_vla_ros.training.rollout import SACCollector, make_envs
    from ire_vla_ros.training.config import EnvConfig
    from ire_vla_ros.training.stages import stage1_sac_sim

    demos = collect_expert_episodes("button-press-topdown-v3", 2, tmp_path / "demos", max_episode_steps=60,
                                    progress=False, action_repeat=2)
    env_cfg = EnvConfig(max_episode_steps=3, action_repeat=2)
    policy = make_tiny_policy()
    cfg = SACConfig(total_env_steps=8, num_envs=2, batch_size=16, num_critics=4, critic_hidden=32,
                    distill_steps=3, critic_pretrain_steps=2, utd=0.5)
    envs = make_envs(["button-press-topdown-v3"], 2, env_cfg)
    try:
        stats = stage1_sac_sim(policy, envs, demos, cfg, episode_root=tmp_path / "rl", iteration=1, progress=False)
        assert stats["demo_transitions"] > 0 and stats["critic_updates"] == 2 + 4
        assert stats["episodes"] == 2 and policy.cfg.action_squash == "tanh"  # 4 decisions x 2 envs, 3 per episode
        # Time limits are not terminal: collect one more episode by hand and look at its transitions.
        from ire_vla_ros.training.sac import LatentReplay, backbone_tag

        tag = backbone_tag(policy)
        replay = LatentReplay(1 << 22, 24, 64, 9, 4, tag=tag)
        collector = SACCollector(envs[:1], cfg)
        for _ in range(3):
            collector.step(policy, replay, tag)
        assert collector.episodes_done == 1 and len(replay) == 3
        assert replay.done[:3].sum() == 0  # truncated at step 3, never done
        # Once the episode ended, its Monte-Carlo returns are known (0: it failed); a running one's are not.
        assert replay.mc_return[:3].tolist() == [0.0, 0.0, 0.0] and replay.success[:3].sum() == 0
        collector.step(policy, replay, tag)
        assert replay.mc_return[3].item() == -math.inf
        # The truncated step's next latent is the final frame, not the reset frame that follows.
        assert not torch.equal(replay.next_hidden[2], collector.latents[0][0].half())
    finally:
        for e in envs:
            e.close()


def test_sac_updates_write_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ire_vla_ros.training import tb

    learner = _learner()
    replay = LatentReplay(1 << 22, 24, 64, 9, 2, tag="t")
    replay.add(**_transitions(32, tokens=24, width=64, S=9, A=2, reward=1.0, done=1.0), tag="t")
    tb.enable(tmp_path)
    try:
        learner.train(replay, replay, 4)
        learner.train(replay, replay, 4)
    finally:
        tb.close()
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"sac/critic_loss", "sac/actor_loss", "sac/alpha", "sac/q_pi", "sac/lr_actor", "sac/lr_critic"} <= tags
    assert len(acc.Scalars("sac/critic_loss")) == 2
