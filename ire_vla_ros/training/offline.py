"""The robot's iRe-VLA iteration, run on recorded episodes (`ire-vla train offline`).

What runs depends on what exists:
- no checkpoint yet (none in the root, no --init): Stage 0 SFT on the teleop episodes;
- a checkpoint and policy/rl episodes it has not consumed yet: Stage 1 with the VLM frozen
  (features computed once per frame), then Stage 2 SFT on teleop + all successful online episodes;
  the new checkpoint's iteration is the old one + 1. Stage 1 is SACfD by default (`stage1.algo:
  sac`: many gradient steps over the teleop demos + *all* policy episodes so far, latents fp16 in
  bounded buffers) or one PPO update on the new episodes (`stage1.algo: ppo`, on-policy data only);
- a checkpoint but no new online episodes: an error saying to record policy episodes first.

The checkpoint's metadata lists the online episodes it consumed, so running twice never trains on
the same rollouts twice.

With `sft_processes` > 1, Stage 0 and Stage 2 run as `ire-vla train sft` under torchrun
(`python -m torch.distributed.run --nproc_per_node N [launcher args] ...`, DDP: docs/SCALE.md) in a
staging directory beside the checkpoint root; Stage 1 stays in this process (one GPU is enough for
the heads). The staged result is re-saved into the root with this iteration's metadata, so `latest`
only ever moves to a complete checkpoint.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from ..episodes.store import read_episode, scan_episodes
from ..vla.checkpoint import CheckpointError, load_checkpoint, read_metadata, resolve_checkpoint, resolve_device, save_checkpoint
from .config import IterateConfig
from .stages import _noop, new_policy, stage0_sft, stage1_ppo_offline, stage1_sac_offline, stage2_sft

log = logging.getLogger(__name__)


class NothingToTrain(RuntimeError):
    pass


def _current_checkpoint(ckpt_root: Path, init: Path | None) -> Path | None:
    try:
        return resolve_checkpoint(ckpt_root)
    except CheckpointError:
        return resolve_checkpoint(init) if init is not None else None


def sft_in_processes(cfg: IterateConfig, episodes: Path, staging: Path, *, processes: int,
                     launcher_args: list[str] | tuple = (), init: Path | None = None):
    """`ire-vla train sft` (Stage 0, or Stage 2 with `init`) under torchrun with `processes` ranks.

    Returns (policy, train stats) of the checkpoint rank 0 wrote under `staging`. The effective
    config goes to the ranks as a YAML file; a failed rank fails the call (RuntimeError).
    """
    import yaml

    staging.mkdir(parents=True, exist_ok=True)
    cfg_file = staging / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    out = staging / "checkpoints"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(int(processes)),
           "--max-restarts", "0", *launcher_args, "-m", "ire_vla_ros.cli", "train", "sft",
           "--episodes", str(episodes), "--checkpoints", str(out), "--config", str(cfg_file), "--no-progress"]
    if init is not None:
        cmd += ["--init", str(init)]
    log.info("multi-process SFT: %s", " ".join(cmd))
    rc = subprocess.call(cmd)  # its output goes to ours (the trainer node's log)
    if rc != 0:
        raise RuntimeError(f"multi-process SFT ({processes} processes) failed with exit code {rc}")
    ckpt = resolve_checkpoint(out)
    return load_checkpoint(ckpt, device=resolve_device(cfg.device)), read_metadata(ckpt)["train"]


def run_offline_iteration(cfg: IterateConfig, episodes: Path, ckpt_root: Path, *, init: Path | None = None,
                          report=_noop, progress: bool = False, sft_processes: int = 1,
                          sft_launcher_args: list[str] | tuple = ()) -> Path:
    if sft_processes > 1:
        staging = Path(ckpt_root).parent / f".{Path(ckpt_root).name}.sft_staging"
        shutil.rmtree(staging, ignore_errors=True)  # a killed earlier run's leftovers
        try:
            return _run_offline_iteration(cfg, episodes, ckpt_root, init=init, report=report, progress=progress,
                                          sft=(sft_processes, list(sft_launcher_args), staging))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _run_offline_iteration(cfg, episodes, ckpt_root, init=init, report=report, progress=progress, sft=None)


def _run_offline_iteration(cfg: IterateConfig, episodes: Path, ckpt_root: Path, *, init, report, progress,
                           sft) -> Path:
    device = resolve_device(cfg.device)
    scan = scan_episodes(episodes)
    for path, reason in scan.rejected:
        log.warning("skipping %s: %s", path, reason)
    expert = scan_episodes(episodes, sources=["teleop"]).episodes
    if not expert:
        raise NothingToTrain(f"no usable teleop episodes under {episodes}: record demonstrations first")
    base = _current_checkpoint(Path(ckpt_root), init)
    if base is None:
        report("stage0", 0.0, f"Stage 0 SFT on {len(expert)} teleop episodes")
        first = read_episode(expert[0], load_images=False)
        if sft is None:
            policy = new_policy(cfg, first.action_spec, first.joint_names, device)
            stats = stage0_sft(policy, expert, cfg.sft, progress=progress)
        else:
            processes, launcher_args, staging = sft
            policy, stats = sft_in_processes(cfg, episodes, staging, processes=processes,
                                             launcher_args=launcher_args)
        report("stage0", 1.0, f"Stage 0 done, loss {stats['loss_last']:.4f}")
        return save_checkpoint(policy, ckpt_root, stage="sft", iteration=0,
                               metadata={"train": stats, "expert": [str(p) for p in expert], "consumed_online": []})

    meta = read_metadata(base)
    consumed = set(meta.get("consumed_online", []))
    online_all = scan_episodes(episodes, sources=["policy", "rl"]).episodes
    new_online = [p for p in online_all if str(p) not in consumed]
    if not new_online:
        raise NothingToTrain(f"checkpoint {base.name} has consumed every policy episode: record new policy episodes first")
    policy = load_checkpoint(base, device=device)
    iteration = int(meta.get("iteration", 0)) + 1
    if cfg.stage1.algo == "sac":  # off-policy: every policy episode so far is usable data
        report("stage1", 0.0, f"Stage 1 SACfD on {len(expert)} teleop + {len(online_all)} policy episodes (VLM frozen)")
        s1 = stage1_sac_offline(policy, expert, online_all, cfg.sac, report=report)
    else:
        report("stage1", 0.0, f"Stage 1 PPO on {len(new_online)} new policy episodes (VLM frozen)")
        s1 = stage1_ppo_offline(policy, new_online, cfg.ppo, report=report)
    s1["algo"] = cfg.stage1.algo
    successful = scan_episodes(episodes, sources=["policy", "rl"], successful_only=True).episodes
    report("stage2", 0.0, f"Stage 2 SFT on {len(expert)} teleop + {len(successful)} successful online episodes")
    if sft is None:
        s2 = stage2_sft(policy, expert, successful, cfg.stage2_sft or cfg.sft, progress=progress)
    else:  # Stage 1's result goes to the ranks as a staged checkpoint
        processes, launcher_args, staging = sft
        stage1_ckpt = save_checkpoint(policy, staging / "stage1", stage="rl", iteration=iteration,
                                      metadata={"stage1": s1})
        policy, s2 = sft_in_processes(cfg, episodes, staging, processes=processes, launcher_args=launcher_args,
                                      init=stage1_ckpt)
    report("stage2", 1.0, f"Stage 2 done, loss {s2['loss_last']:.4f}")
    return save_checkpoint(policy, ckpt_root, stage="sft", iteration=iteration,
                           metadata={"stage1": s1, "stage2": s2, "parent": str(base), "expert": [str(p) for p in expert],
                                     "consumed_online": sorted(consumed | {str(p) for p in new_online})})
