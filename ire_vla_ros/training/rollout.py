"""Running the policy in simulated environments: PPO and SAC rollouts, and evaluation.

Several environments step in lock-step so the backbone runs once per step for all of them (one
batched forward); during Stage 1 its features go straight into the `FrozenFeatureCache`.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..vla.policy import VLAPolicy
from .config import EnvConfig, PPOConfig, success_bonus
from .ppo import FrozenFeatureCache

log = logging.getLogger(__name__)


def make_envs(tasks: list[str], n_per_task: int, env_cfg: EnvConfig, render: bool = True):
    from ..sim.metaworld_env import MetaworldTaskEnv

    return [MetaworldTaskEnv(task, image_size=env_cfg.image_size, camera=env_cfg.camera,
                             max_episode_steps=env_cfg.max_episode_steps, render=render,
                             action_repeat=env_cfg.action_repeat)
            for task in tasks for _ in range(n_per_task)]


@dataclass
class EpisodeRecord:
    """An episode being collected in one env, written to the store if it succeeds."""

    images: list = field(default_factory=list)
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    log_probs: list = field(default_factory=list)
    values: list = field(default_factory=list)


class _EpisodeBookkeeping:
    """Episode ends shared by the PPO and SAC collectors: counters, and the successful episodes kept
    as `rl` episode files for Stage 2.

    The files are written by a child process (episodes/safe_writer.WriterProcess, as the recorder
    and `ire-vla collect` do): h5py on a full disk can take the writing process down (measured:
    SIGSEGV), and here that process is the training. A write that fails (disk full, under
    `min_free_mb`, I/O error) is counted in `write_failures` and logged; training goes on, the
    episodes written before stay intact, and Stage 2 gets those."""

    min_free_mb: float = 50.0  # keep this much free on the episodes' disk (as `ire-vla collect`)
    _writers = None

    def _finish_episode(self, i: int, env, success: bool) -> None:
        rec = self.records[i]
        self.episodes_done += 1
        self.successes += int(success)
        self.recent.append((env.task, success))
        if success and self.cfg.keep_successful and self.episode_root is not None:
            self._keep(env, rec)
        self.records[i] = EpisodeRecord()

    def _keep(self, env, rec: EpisodeRecord) -> None:
        from ..episodes.safe_writer import EpisodeWriteError, WriterProcess

        if self._writers is None:
            self._writers = WriterProcess(min_free_mb=self.min_free_mb)
        try:
            self.saved.append(write_episode(self._writers, self.episode_root, env, rec, source="rl", success=True,
                                            iteration=self.iteration))
        except EpisodeWriteError as exc:
            self.write_failures += 1
            log.warning("successful episode not kept for Stage 2 (%d so far): %s", self.write_failures, exc)

    def close(self) -> None:
        """Stop the writer child (if one was started)."""
        if self._writers is not None:
            self._writers.close()
            self._writers = None


class RolloutCollector(_EpisodeBookkeeping):
    """Steps N envs with the current (stochastic) policy and fills a FrozenFeatureCache."""

    def __init__(self, envs, cfg: PPOConfig, *, seed_start: int | None = None, episode_root: Path | None = None,
                 iteration: int = 0, keep_images: bool = False):
        self.keep_images = keep_images or not cfg.freeze_backbone  # full-model PPO must re-encode
        self.envs = envs
        self.cfg = cfg
        # Training placements cycle below the held-out evaluation seeds, never into them.
        from ..sim.metaworld_env import HELDOUT_SEED_OFFSET

        start = seed_start if seed_start is not None else 1000
        self.seeds = (s % HELDOUT_SEED_OFFSET for s in itertools.count(start))
        self.episode_root = episode_root
        self.iteration = iteration
        self.obs = [env.reset(seed=next(self.seeds)) for env in envs]
        self.records = [EpisodeRecord() for _ in envs]
        self.episodes_done = 0
        self.successes = 0
        self.saved: list[Path] = []
        self.write_failures = 0  # successful episodes that could not be written (disk full, I/O)
        self.recent: list[tuple[str, bool]] = []

    def collect(self, policy: VLAPolicy, steps_per_env: int) -> FrozenFeatureCache:
        cfg, n = self.cfg, len(self.envs)
        if cfg.reward not in ("sparse", "dense"):
            raise ValueError(f"ppo.reward must be 'sparse' or 'dense', got {cfg.reward!r}")
        bonus = success_bonus(cfg)
        keep_images = self.keep_images
        hidden, mask, states, actions, logps, values = [], [], [], [], [], []
        rewards = torch.zeros(steps_per_env, n)
        dones = torch.zeros(steps_per_env, n)
        timeouts = torch.zeros(steps_per_env, n)
        timeout_values = torch.zeros(steps_per_env, n)
        images, texts = [], []
        policy.eval()
        for t in range(steps_per_env):
            imgs = np.stack([o.image for o in self.obs])
            st = np.stack([o.state for o in self.obs])
            instr = [o.instruction for o in self.obs]
            out = policy.act_batch(imgs, st, instr, deterministic=False)
            hidden.append(out.hidden)
            mask.append(out.mask.bool())
            states.append(policy.normalize_state(st))
            actions.append(torch.as_tensor(out.normalized, device=policy.device))
            logps.append(torch.as_tensor(out.log_probs, device=policy.device))
            values.append(torch.as_tensor(out.values, device=policy.device))
            if keep_images:
                images.append(imgs)
                texts.append(instr)
            for i, env in enumerate(self.envs):
                obs, dense, terminated, truncated, info = env.step(out.actions[i])
                success = bool(info.get("success", False))
                r = bonus if success else 0.0
                if cfg.reward == "dense" and not success:
                    r = dense * cfg.dense_reward_scale
                rewards[t, i] = r
                rec = self.records[i]
                rec.images.append(self.obs[i].image)
                rec.states.append(self.obs[i].state)
                rec.actions.append(out.actions[i])
                rec.rewards.append(r)
                rec.log_probs.append(out.log_probs[i])
                rec.values.append(out.values[i])
                if terminated or truncated:
                    if terminated:
                        dones[t, i] = 1.0
                    else:
                        timeouts[t, i] = 1.0
                        with torch.no_grad():
                            fin = policy.act_batch(obs.image[None], obs.state[None], [obs.instruction], True)
                        timeout_values[t, i] = float(fin.values[0])
                    self._finish_episode(i, env, success)
                    obs = env.reset(seed=next(self.seeds))
                self.obs[i] = obs
        with torch.no_grad():
            last = policy.act_batch(np.stack([o.image for o in self.obs]), np.stack([o.state for o in self.obs]),
                                    [o.instruction for o in self.obs], True)
        pad = max(h.shape[1] for h in hidden)  # a pretrained processor pads per batch: align lengths
        hidden = [torch.nn.functional.pad(h, (0, 0, 0, pad - h.shape[1])) for h in hidden]
        mask = [torch.nn.functional.pad(m, (0, pad - m.shape[1])) for m in mask]
        dev = policy.device
        return FrozenFeatureCache(
            hidden=torch.stack(hidden), mask=torch.stack(mask), states=torch.stack(states),
            actions=torch.stack(actions), log_probs=torch.stack(logps), values=torch.stack(values),
            rewards=rewards.to(dev), dones=dones.to(dev), timeouts=timeouts.to(dev),
            timeout_values=timeout_values.to(dev), last_values=torch.as_tensor(last.values, device=dev),
            images=np.stack(images) if keep_images else None, instructions=texts if keep_images else None,
        )


class SACCollector(_EpisodeBookkeeping):
    """Steps N envs with the tanh policy's stochastic actions and adds each transition to a
    `LatentReplay` right away: every observation goes through the frozen backbone exactly once
    (its latent is the next latent of one transition and the latent the next action is chosen
    from). Successful episodes are written to the store for Stage 2."""

    def __init__(self, envs, cfg, *, seed_start: int | None = None, episode_root: Path | None = None,
                 iteration: int = 0):
        from ..sim.metaworld_env import HELDOUT_SEED_OFFSET

        self.envs, self.cfg = envs, cfg
        start = seed_start if seed_start is not None else 1000
        self.seeds = (s % HELDOUT_SEED_OFFSET for s in itertools.count(start))
        self.episode_root, self.iteration = episode_root, iteration
        self.obs = [env.reset(seed=next(self.seeds)) for env in envs]
        self.records = [EpisodeRecord() for _ in envs]
        self.latents: tuple[torch.Tensor, torch.Tensor] | None = None
        self.slots: list[list[int]] = [[] for _ in envs]  # each env's current episode in the replay
        self.added_at = [0 for _ in envs]
        self.episodes_done = 0
        self.successes = 0
        self.saved: list[Path] = []
        self.write_failures = 0  # successful episodes that could not be written (disk full, I/O)
        self.recent: list[tuple[str, bool]] = []

    @torch.no_grad()
    def _encode(self, policy: VLAPolicy, obs: list) -> tuple[torch.Tensor, torch.Tensor]:
        return policy.encode(np.stack([o.image for o in obs]), [o.instruction for o in obs])

    @torch.no_grad()
    def step(self, policy: VLAPolicy, replay, tag: str) -> int:
        """One decision in every env; returns the number of transitions added (= number of envs)."""
        from .sac import episode_rewards

        cfg = self.cfg
        policy.eval()
        if self.latents is None:
            self.latents = self._encode(policy, self.obs)
        hidden, mask = self.latents
        states = np.stack([o.state for o in self.obs])
        state_n = policy.normalize_state(states)
        dist = policy.distribution(hidden, mask, state_n)
        a_n = policy.deterministic_action(dist.sample())
        behaviour = policy.deterministic_action(dist.mean)
        actions = policy.unnormalize_action(a_n).cpu().numpy().astype(np.float32)
        next_obs, rewards, dones, resets, ended = [], [], [], {}, {}
        for i, env in enumerate(self.envs):
            obs, dense, terminated, truncated, info = env.step(actions[i])
            success = bool(info.get("success", False))
            rewards.append(float(episode_rewards(np.array([dense]), success, cfg)[0]))
            dones.append(1.0 if terminated else 0.0)  # truncation is not terminal: it bootstraps
            rec = self.records[i]
            rec.images.append(self.obs[i].image)
            rec.states.append(self.obs[i].state)
            rec.actions.append(actions[i])
            rec.rewards.append(rewards[-1])
            next_obs.append(obs)
            if terminated or truncated:
                ended[i] = (list(self.records[i].rewards), success)
                self._finish_episode(i, env, success)
                resets[i] = env.reset(seed=next(self.seeds))
        # One backbone call for the next frames and the frames of the envs that were just reset
        # (the first frame of their next episode): a batch of 8-10 instead of two calls.
        idx = sorted(resets)
        all_hidden, all_mask = self._encode(policy, next_obs + [resets[i] for i in idx])
        n_envs = len(self.envs)
        next_hidden, next_mask = all_hidden[:n_envs], all_mask[:n_envs]
        slots = replay.add(hidden=hidden, mask=mask, state=state_n, action=a_n, reward=torch.tensor(rewards),
                           done=torch.tensor(dones), next_hidden=next_hidden, next_mask=next_mask,
                           next_state=policy.normalize_state(np.stack([o.state for o in next_obs])),
                           behaviour_action=behaviour, tag=tag)
        for i in range(len(self.envs)):
            if not self.slots[i]:
                self.added_at[i] = replay.added - len(self.envs)
            self.slots[i].append(int(slots[i]))
        for i, (ep_rewards, success) in ended.items():  # now the episode's returns are known
            replay.finish_episode(self.slots[i], self.added_at[i], ep_rewards, success, cfg.gamma)
            self.slots[i] = []
        self.obs = [resets.get(i, o) for i, o in enumerate(next_obs)]
        if resets:
            next_hidden, next_mask = next_hidden.clone(), next_mask.clone()
            next_hidden[idx], next_mask[idx] = all_hidden[n_envs:], all_mask[n_envs:]
        self.latents = (next_hidden, next_mask)
        return len(self.envs)



def write_episode(writers, root: Path, env, rec: EpisodeRecord, *, source: str, success: bool,
                  iteration: int) -> Path:
    """One recorded episode -> an episode file, through `writers` (a safe_writer.WriterProcess).
    EpisodeWriteError (disk full, I/O error): nothing is left behind for this episode."""
    writer = writers.open(root, dict(instruction=env.instruction, task=env.task, source=source,
                                     action_spec=env.action_spec, joint_names=env.joint_names, iteration=iteration))
    try:
        t0 = time.time()
        for k in range(len(rec.actions)):
            writer.append(images={"main": rec.images[k]}, joint_positions=rec.states[k], action=rec.actions[k],
                          reward=rec.rewards[k], timestamp=t0 + 0.1 * k,
                          log_prob=rec.log_probs[k] if rec.log_probs else None,
                          value=rec.values[k] if rec.values else None)
        return writer.finalize(success)
    except BaseException:
        writer.abort()  # no-op after a fault (the child removed the partial file already)
        raise


@torch.no_grad()
def evaluate(policy: VLAPolicy, envs, seeds: list[int], *, deterministic: bool = True,
             video_path: Path | None = None, progress=None) -> dict:
    """Success rate of `policy` on each env's task over the given held-out seeds.

    `envs` holds one or more envs per task; they step in lock-step, each running its share of seeds.
    Returns {task: {"success_rate", "episodes", "successes", "mean_steps"}}.
    """
    policy.eval()
    by_task: dict[str, list] = {}
    for env in envs:
        by_task.setdefault(env.task, []).append(env)
    queue = {task: list(seeds) for task in by_task}
    results = {task: {"successes": 0, "episodes": 0, "steps": []} for task in by_task}
    active = []  # [env, steps, frames or None]
    frames_by_task: dict[str, list] = {}
    obs = {}
    for task, task_envs in by_task.items():
        for env in task_envs:
            if queue[task]:
                obs[id(env)] = env.reset(seed=queue[task].pop(0))
                active.append([env, 0, [] if (video_path is not None and task not in frames_by_task) else None])
                if active[-1][2] is not None:
                    frames_by_task[task] = active[-1][2]
    while active:
        o = [obs[id(a[0])] for a in active]
        out = policy.act_batch(np.stack([x.image for x in o]), np.stack([x.state for x in o]),
                               [x.instruction for x in o], deterministic)
        still = []
        for k, slot in enumerate(active):
            env = slot[0]
            if slot[2] is not None:
                slot[2].append(env.render_frame() if hasattr(env, "render_frame") else o[k].image)
            nxt, _, terminated, truncated, info = env.step(out.actions[k])
            slot[1] += 1
            if terminated or truncated:
                res = results[env.task]
                res["episodes"] += 1
                res["successes"] += int(bool(info.get("success", False)))
                res["steps"].append(slot[1])
                if progress is not None:
                    progress.update(1)
                if queue[env.task]:
                    obs[id(env)] = env.reset(seed=queue[env.task].pop(0))
                    still.append([env, 0, None])
            else:
                obs[id(env)] = nxt
                still.append(slot)
        active = still
    if video_path is not None and frames_by_task:
        write_video(video_path, frames_by_task)
    return {task: {"success_rate": r["successes"] / max(r["episodes"], 1), "episodes": r["episodes"],
                   "successes": r["successes"], "mean_steps": float(np.mean(r["steps"])) if r["steps"] else 0.0}
            for task, r in results.items()}


def write_video(path: Path, frames_by_task: dict[str, list], fps: int = 20, scale: int = 4) -> None:
    """One MP4 with the tasks side by side (first evaluation episode of each)."""
    import cv2
    import imageio.v2 as imageio

    clips = list(frames_by_task.values())
    length = max(len(c) for c in clips)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1) as w:
        for t in range(length):
            row = [c[min(t, len(c) - 1)] for c in clips]
            frame = np.concatenate(row, axis=1)
            frame = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
            w.append_data(frame)
