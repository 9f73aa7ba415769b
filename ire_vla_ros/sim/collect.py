"""Collect scripted-expert demonstrations in Metaworld into the HDF5 episode store.

Each step records the observation *before* the action (image "main", joint positions), the
action actually executed (expert + Gaussian noise, clipped to [-1, 1]), the dense reward that
followed and the simulated time. The episode's `success` attr is set either way; with
`only_successful=True` failed episodes are discarded and further seeds are tried.

Episodes are written by a child process (episodes/safe_writer.py): when the disk fills, the
episode in progress is aborted with a clear error (`CollectError`) and every finished episode stays
intact, instead of h5py taking the process down with SIGSEGV. Free space (`min_free_mb`) is
checked before each episode and each step.

CLI: `python -m ire_vla_ros.sim.collect --task button-press-topdown-v3 -n 20 --out data/demos`
No ROS imports.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ire_vla_ros.sim.experts import noise_rng, noisy_expert_action
from ire_vla_ros.sim.metaworld_env import DEFAULT_CAMERA, HELDOUT_SEED_OFFSET, MetaworldTaskEnv

_log = logging.getLogger(__name__)

DEFAULT_MIN_FREE_MB = 50.0


class CollectError(RuntimeError):
    """Collection stopped (disk full, I/O error); `paths` holds the episodes finished before."""

    def __init__(self, message: str, paths: list[Path]):
        super().__init__(message)
        self.paths = paths


def collect_expert_episodes(
    task: str,
    n_episodes: int,
    out_root,
    *,
    seed0: int = 0,
    noise_std: float = 0.1,
    image_size: int = 64,
    camera: str = DEFAULT_CAMERA,
    max_episode_steps: int = 150,
    progress: bool = True,
    only_successful: bool = False,
    max_attempts: int | None = None,
    source: str = "teleop",
    iteration: int = 0,
    camera_name: str = "main",
    action_repeat: int = 1,
    min_free_mb: float = DEFAULT_MIN_FREE_MB,
) -> list[Path]:
    """Roll out the scripted expert on seeds seed0, seed0+1, ... and write one episode per rollout.

    Returns the paths of the written episodes (n_episodes of them, or fewer if `only_successful`
    and `max_attempts` (default 2*n_episodes+10) rollouts did not give enough successes).
    Raises CollectError (with the finished episodes' paths) when the disk fills or fails.
    """
    from tqdm.auto import tqdm

    from ire_vla_ros.diskspace import DiskSpaceError, require_free_space
    from ire_vla_ros.episodes.safe_writer import EpisodeWriteError, WriterProcess

    if n_episodes < 0:
        raise ValueError("n_episodes must be >= 0")
    if max_attempts is None:
        max_attempts = 2 * n_episodes + 10 if only_successful else n_episodes
    if not only_successful:  # every rollout is kept
        max_attempts = max(max_attempts, n_episodes)
    if seed0 < HELDOUT_SEED_OFFSET <= seed0 + max_attempts - 1:
        _log.warning("collection seeds %d..%d reach into the held-out evaluation seeds (>= %d)",
                     seed0, seed0 + max_attempts - 1, HELDOUT_SEED_OFFSET)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    n_success = n_tried = 0
    try:
        require_free_space(out_root, min_free_mb, what="collecting")
    except DiskSpaceError as exc:
        raise CollectError(f"{task}: nothing collected: {exc}", paths) from None
    writers = WriterProcess(min_free_mb=min_free_mb)
    env = MetaworldTaskEnv(task, image_size=image_size, camera=camera, max_episode_steps=max_episode_steps,
                           seed=seed0, render=True, action_repeat=action_repeat)
    dt = float(env.unwrapped.dt)
    bar = tqdm(total=n_episodes, desc=f"collect {task}", unit="ep", disable=not progress)
    try:
        seed = seed0
        while len(paths) < n_episodes and n_tried < max_attempts:
            obs = env.reset(seed)
            rng = noise_rng(seed, noise_std)
            success = False
            try:
                writer = writers.open(out_root, dict(
                    instruction=env.instruction, task=task, source=source, action_spec=env.action_spec,
                    joint_names=env.joint_names, camera_names=(camera_name,), iteration=iteration,
                    metadata={"seed": int(seed), "noise_std": float(noise_std), "camera": camera,
                              "image_size": int(image_size), "collector": "metaworld_scripted_expert",
                              "placement": [float(x) for x in env.placement]},
                ))
            except EpisodeWriteError as exc:
                raise CollectError(f"{task}: stopped after {len(paths)} episodes: {exc}", paths) from None
            try:
                while True:
                    action = noisy_expert_action(env, rng, noise_std)
                    t = env.steps * dt
                    next_obs, reward, terminated, truncated, info = env.step(action)
                    writer.append(images={camera_name: obs.image}, joint_positions=obs.state,
                                  action=info["action"], reward=reward, timestamp=t)
                    obs = next_obs
                    if terminated or truncated:
                        success = bool(info["success"])
                        break
                kept = success or not only_successful
                if kept:
                    paths.append(writer.finalize(success, metadata={"steps": env.steps}))
                else:
                    writer.abort()
            except EpisodeWriteError as exc:
                raise CollectError(f"{task}: stopped after {len(paths)} episodes "
                                   f"(finished ones kept): {exc}", paths) from None
            except BaseException:
                writer.abort()
                raise
            n_tried += 1
            n_success += success
            bar.set_postfix(success=f"{n_success}/{n_tried}", refresh=False)
            bar.update(int(kept))
            seed += 1
    finally:
        bar.close()
        env.close()
        writers.close()
    if len(paths) < n_episodes:
        _log.warning("%s: only %d/%d successful episodes after %d attempts", task, len(paths), n_episodes, n_tried)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Collect scripted-expert Metaworld demonstrations as HDF5 episodes.")
    p.add_argument("--task", required=True)
    p.add_argument("-n", "--episodes", type=int, default=20)
    p.add_argument("--out", required=True, help="episode directory")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--camera", default=DEFAULT_CAMERA)
    p.add_argument("--max-episode-steps", type=int, default=150)
    p.add_argument("--only-successful", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--min-free-mb", type=float, default=DEFAULT_MIN_FREE_MB,
                   help="stop (keeping finished episodes) when less disk is free (default %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        paths = collect_expert_episodes(
            args.task, args.episodes, args.out, seed0=args.seed0, noise_std=args.noise_std,
            image_size=args.image_size, camera=args.camera, max_episode_steps=args.max_episode_steps,
            progress=not args.no_progress, only_successful=args.only_successful, min_free_mb=args.min_free_mb,
        )
    except CollectError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} episodes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
