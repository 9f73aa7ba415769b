"""Metaworld sim env, scripted expert and demo collection (real MuJoCo, offscreen EGL)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("metaworld")

from ire_vla_ros.sim import (  # noqa: E402
    HELDOUT_SEED_OFFSET,
    SAWYER_JOINT_NAMES,
    TASK_INSTRUCTIONS,
    MetaworldTaskEnv,
    heldout_seeds,
    train_seeds,
)
from ire_vla_ros.vla.action_spec import METAWORLD_4D  # noqa: E402

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def env():
    e = MetaworldTaskEnv(TASK, image_size=64)
    yield e
    e.close()


@pytest.fixture(scope="module")
def fast_env():
    e = MetaworldTaskEnv(TASK, render=False)
    yield e
    e.close()


def test_interface(env):
    assert env.task == TASK
    assert env.instruction == TASK_INSTRUCTIONS[TASK] == "press the button from the top"
    assert env.action_spec == METAWORLD_4D
    assert env.joint_names == list(SAWYER_JOINT_NAMES) and len(env.joint_names) == 9
    obs = env.reset(0)
    assert obs.instruction == env.instruction
    assert obs.state.shape == (9,) and obs.state.dtype == np.float32
    np.testing.assert_array_equal(obs.state, env.joint_positions())
    assert env.ee_position().shape == (3,)


def test_image_shape_dtype_not_blank(env):
    img = env.reset(0).image
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_render_false_gives_zero_images(fast_env):
    img = fast_env.reset(0).image
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and not img.any()


def test_reset_is_deterministic_per_seed(env):
    a = env.reset(3)
    pa = env.placement.copy()
    env.step(np.array([1.0, 1.0, 1.0, 1.0]))
    b = env.reset(3)
    np.testing.assert_array_equal(env.placement, pa)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.state, b.state)
    assert env.steps == 0
    # a fresh env gives the same scene for the same seed
    other = MetaworldTaskEnv(TASK, image_size=64)
    try:
        np.testing.assert_array_equal(other.reset(3).image, a.image)
        np.testing.assert_array_equal(other.placement, pa)
    finally:
        other.close()


def test_different_seeds_differ(env):
    placements, images = [], []
    for s in [0, 1, 2, HELDOUT_SEED_OFFSET]:
        images.append(env.reset(s).image)
        placements.append(env.placement.copy())
    for i in range(len(placements)):
        for j in range(i + 1, len(placements)):
            assert not np.allclose(placements[i], placements[j])
            assert not np.array_equal(images[i], images[j])


def test_seed_helpers():
    tr, ho = train_seeds(100), heldout_seeds(50)
    assert tr == list(range(100)) and ho[0] == HELDOUT_SEED_OFFSET
    assert not set(tr) & set(ho)
    with pytest.raises(ValueError):
        train_seeds(HELDOUT_SEED_OFFSET + 1)


def test_expert_solves_easy_task(fast_env):
    for seed in (0, 1):
        fast_env.reset(seed)
        for _ in range(fast_env.max_episode_steps):
            a = fast_env.expert_action()
            assert a.shape == (4,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
            _, reward, terminated, truncated, info = fast_env.step(a)
            assert isinstance(info["success"], bool) and isinstance(reward, float)
            if terminated or truncated:
                break
        assert terminated and info["success"] and fast_env.steps < 120


def test_step_clips_actions():
    e1, e2 = MetaworldTaskEnv(TASK, render=False), MetaworldTaskEnv(TASK, render=False)
    try:
        e1.reset(5), e2.reset(5)
        for _ in range(5):
            o1, r1, *_, info = e1.step(np.array([5.0, -7.0, 0.5, 3.0]))
            o2, r2, *_ = e2.step(np.array([1.0, -1.0, 0.5, 1.0]))
        np.testing.assert_allclose(info["action"], [1.0, -1.0, 0.5, 1.0])
        np.testing.assert_array_equal(o1.state, o2.state)
        np.testing.assert_array_equal(e1.ee_position(), e2.ee_position())
        assert r1 == r2
        with pytest.raises(ValueError):
            e1.step(np.zeros(3))
    finally:
        e1.close(), e2.close()


def test_hand_moves_with_action(fast_env):
    fast_env.reset(0)
    p0 = fast_env.ee_position()
    for _ in range(10):
        fast_env.step(np.array([0.0, 0.0, 1.0, 0.0]))
    assert fast_env.ee_position()[2] > p0[2] + 0.03


def test_truncation_and_no_metaworld_limit():
    e = MetaworldTaskEnv(TASK, render=False, max_episode_steps=7)
    try:
        e.reset(0)
        flags = [e.step(np.zeros(4))[3] for _ in range(7)]
        assert flags == [False] * 6 + [True]
        # Stepping on past Metaworld's own max_path_length (500) never raises.
        for _ in range(510):
            _, _, _, truncated, _ = e.step(np.zeros(4))
            assert truncated
        e.reset(1)
        assert e.steps == 0
        assert not e.step(np.zeros(4))[3]
    finally:
        e.close()


def test_render_from_other_thread(env):
    env.reset(0)
    main_img = env.render()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("img", env.render()))
    t.start(), t.join()
    np.testing.assert_array_equal(out["img"], main_img)


def test_close_is_idempotent():
    e = MetaworldTaskEnv(TASK, image_size=32)
    assert e.reset(0).image.shape == (32, 32, 3)
    e.close(), e.close()
    with pytest.raises(RuntimeError):
        e.step(np.zeros(4))


def test_collect_writes_readable_episodes(tmp_path):
    from ire_vla_ros.episodes.store import read_episode, scan_episodes
    from ire_vla_ros.sim.collect import collect_expert_episodes

    paths = collect_expert_episodes(TASK, 2, tmp_path, seed0=0, noise_std=0.1, image_size=32, progress=False)
    assert len(paths) == 2 and all(p.exists() for p in paths)
    scan = scan_episodes(tmp_path)
    assert sorted(scan.episodes) == sorted(paths) and not scan.rejected
    for p in paths:
        ep = read_episode(p)
        T = len(ep.actions)
        assert ep.success and ep.task == TASK and ep.instruction == TASK_INSTRUCTIONS[TASK]
        assert ep.source == "teleop" and ep.joint_names == list(SAWYER_JOINT_NAMES)
        assert ep.images["main"].shape == (T, 32, 32, 3) and ep.images["main"].dtype == np.uint8
        assert ep.joint_positions.shape == (T, 9) and ep.actions.shape == (T, 4) and ep.rewards.shape == (T,)
        assert np.all(np.abs(ep.actions) <= 1.0) and np.all(np.diff(ep.timestamps) > 0)
        assert 10 < T < 150
    # the recorded actions replay the episode exactly (they are what was executed)
    ep = read_episode(paths[0])
    e = MetaworldTaskEnv(TASK, image_size=32)
    try:
        obs = e.reset(0)
        np.testing.assert_array_equal(obs.image, ep.images["main"][0])
        for a in ep.actions:
            _, _, terminated, _, _ = e.step(a)
        assert terminated
    finally:
        e.close()


def test_collect_only_successful_discards_failures(tmp_path):
    from ire_vla_ros.sim.collect import collect_expert_episodes

    # 3 steps are far too few to press the button: every rollout fails
    kept = collect_expert_episodes(TASK, 2, tmp_path / "ok", max_episode_steps=3, only_successful=True,
                                   max_attempts=3, image_size=32, progress=False)
    assert kept == [] and not list((tmp_path / "ok").iterdir())
    flagged = collect_expert_episodes(TASK, 1, tmp_path / "all", max_episode_steps=3, image_size=32, progress=False)
    from ire_vla_ros.episodes.store import read_episode

    assert len(flagged) == 1 and read_episode(flagged[0]).success is False
