"""Torch dataset of episode steps, expert/online mixing and action statistics (no ROS)."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, WeightedRandomSampler

from ire_vla_ros.episodes.store import Episode, EpisodeError, read_episode

__all__ = [
    "EpisodeStepDataset",
    "mixed_sampler",
    "mixed_dataset",
    "mixing_weights",
    "collate",
    "action_statistics",
    "STD_FLOOR",
]

_log = logging.getLogger(__name__)
STD_FLOOR = 1e-3


class EpisodeStepDataset(Dataset):
    """All steps of the given episodes, loaded into memory.

    Item: {"image": uint8 tensor (H, W, 3), "state": float32 (J,), "action": float32 (A,),
           "instruction": str, "episode": int (index into `paths`), "step": int, "source": str}

    `paths` may also contain already-loaded `Episode` objects. All episodes must share the image
    shape of `camera`, the state dim and the action dim (else ValueError). A file that fails
    `read_episode` raises EpisodeError (on_error="raise") or is skipped with a warning
    (on_error="skip"; skipped files are then listed in `.skipped`).
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike | Episode],
        camera: str = "main",
        *,
        on_error: str = "raise",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        self.camera = camera
        self.episode_paths: list[Any] = []
        self.instructions: list[str] = []
        self.sources: list[str] = []
        self.tasks: list[str] = []
        self.successes: list[bool] = []
        self.action_specs: list[Any] = []
        # Per episode: the object/goal placement a simulation collector recorded in the metadata
        # (None for robot episodes); SFT's optional auxiliary loss predicts it from the latent.
        self.placements: list[np.ndarray | None] = []
        self.skipped: list[tuple[Any, str]] = []
        images, states, actions, ep_idx, step_idx = [], [], [], [], []
        for item in paths:
            try:
                ep = item if isinstance(item, Episode) else read_episode(item, load_images=True)
                if camera not in ep.images:
                    raise EpisodeError(f"{ep.path}: no camera '{camera}' (has {sorted(ep.images)})")
            except EpisodeError as e:
                if on_error == "raise":
                    raise
                _log.warning("skipping episode: %s", e)
                self.skipped.append((item, str(e)))
                continue
            img = ep.images[camera]
            if images:
                if img.shape[1:] != images[0].shape[1:]:
                    raise ValueError(f"{ep.path}: image shape {img.shape[1:]} != {images[0].shape[1:]} of earlier episodes")
                if ep.joint_positions.shape[1] != states[0].shape[1]:
                    raise ValueError(f"{ep.path}: state dim {ep.joint_positions.shape[1]} != {states[0].shape[1]}")
                if ep.actions.shape[1] != actions[0].shape[1]:
                    raise ValueError(f"{ep.path}: action dim {ep.actions.shape[1]} != {actions[0].shape[1]}")
            e = len(self.episode_paths)
            self.episode_paths.append(ep.path)
            self.instructions.append(ep.instruction)
            self.sources.append(ep.source)
            self.tasks.append(ep.task)
            self.successes.append(ep.success)
            self.action_specs.append(ep.action_spec)
            placement = ep.metadata.get("placement")
            self.placements.append(None if placement is None else np.asarray(placement, np.float32).ravel())
            images.append(img)
            states.append(ep.joint_positions.astype(np.float32, copy=False))
            actions.append(ep.actions.astype(np.float32, copy=False))
            ep_idx.append(np.full(ep.n_steps, e, np.int64))
            step_idx.append(np.arange(ep.n_steps, dtype=np.int64))
        if images:
            self.images = np.concatenate(images)
            self.states = np.concatenate(states)
            self.actions = np.concatenate(actions)
            self.episode_index = np.concatenate(ep_idx)
            self.step_index = np.concatenate(step_idx)
        else:
            self.images = np.zeros((0, 0, 0, 3), np.uint8)
            self.states = np.zeros((0, 0), np.float32)
            self.actions = np.zeros((0, 0), np.float32)
            self.episode_index = np.zeros(0, np.int64)
            self.step_index = np.zeros(0, np.int64)

    @property
    def n_episodes(self) -> int:
        return len(self.episode_paths)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        e = int(self.episode_index[i])
        return {
            "image": torch.from_numpy(self.images[i]),
            "state": torch.from_numpy(self.states[i]),
            "action": torch.from_numpy(self.actions[i]),
            "instruction": self.instructions[e],
            "episode": e,
            "step": int(self.step_index[i]),
            "source": self.sources[e],
        }


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items: image (B,H,W,3) uint8, state (B,J), action (B,A) float32,
    instruction list[str], episode/step LongTensor (B,), source list[str]."""
    if not batch:
        raise ValueError("collate: empty batch")
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "state": torch.stack([b["state"] for b in batch]),
        "action": torch.stack([b["action"] for b in batch]),
        "instruction": [b["instruction"] for b in batch],
        "episode": torch.tensor([b["episode"] for b in batch], dtype=torch.long),
        "step": torch.tensor([b["step"] for b in batch], dtype=torch.long),
        "source": [b.get("source", "") for b in batch],
    }


def mixing_weights(expert_len: int, online_len: int, online_fraction: float = 0.5) -> torch.Tensor:
    """Per-sample weights over `ConcatDataset([expert, online])` (expert indices first) such that
    a draw is online with probability `online_fraction` (uniform within each part). With no online
    data everything is expert; with no expert data everything is online."""
    if not 0.0 <= online_fraction <= 1.0:
        raise ValueError(f"online_fraction must be in [0, 1], got {online_fraction}")
    if expert_len < 0 or online_len < 0:
        raise ValueError("lengths must be >= 0")
    if expert_len + online_len == 0:
        raise ValueError("no data: expert and online datasets are both empty")
    f = online_fraction
    if online_len == 0:
        f = 0.0
    elif expert_len == 0:
        f = 1.0
    w = torch.empty(expert_len + online_len, dtype=torch.double)
    if expert_len:
        w[:expert_len] = (1.0 - f) / expert_len
    if online_len:
        w[expert_len:] = f / online_len
    if float(w.sum()) <= 0:  # e.g. online_fraction=1 but... cannot happen after the fix-ups above
        raise ValueError("all sampling weights are zero")
    return w


def mixed_sampler(
    expert_len: int,
    online_len: int,
    *,
    online_fraction: float = 0.5,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> WeightedRandomSampler:
    """WeightedRandomSampler (with replacement) over `ConcatDataset([expert, online])`.

    `num_samples` defaults to expert_len + online_len (one "epoch"). Pass `generator` or `seed`
    for reproducibility.
    """
    w = mixing_weights(expert_len, online_len, online_fraction)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    n = int(num_samples) if num_samples is not None else expert_len + online_len
    return WeightedRandomSampler(w, num_samples=n, replacement=True, generator=generator)


def mixed_dataset(
    expert: Dataset,
    online: Dataset | None,
    *,
    online_fraction: float = 0.5,
    num_samples: int | None = None,
    seed: int | None = None,
) -> tuple[ConcatDataset, WeightedRandomSampler]:
    """(ConcatDataset([expert, online]), sampler) ready for
    `DataLoader(ds, batch_size=..., sampler=sampler, collate_fn=collate)`."""
    parts = [expert] + ([online] if online is not None else [])
    ds = ConcatDataset(parts)
    sampler = mixed_sampler(
        len(expert), len(online) if online is not None else 0,
        online_fraction=online_fraction, num_samples=num_samples, seed=seed,
    )
    return ds, sampler


def action_statistics(*datasets: EpisodeStepDataset | np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float32, std floored at STD_FLOOR) of the actions over all given datasets
    (EpisodeStepDataset, or raw (N, A) action arrays). Empty datasets are ignored."""
    arrays = []
    for d in datasets:
        if isinstance(d, EpisodeStepDataset):
            a = d.actions
        elif isinstance(d, torch.Tensor):
            a = d.detach().cpu().numpy()
        else:
            a = np.asarray(d)
        if a.size == 0:
            continue
        if a.ndim != 2:
            raise ValueError(f"actions must be (N, A), got {a.shape}")
        arrays.append(a.astype(np.float64))
    if not arrays:
        raise ValueError("action_statistics: no actions")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise ValueError(f"action_statistics: inconsistent action dims {sorted(dims)}")
    a = np.concatenate(arrays)
    if not np.isfinite(a).all():
        raise ValueError("action_statistics: actions contain NaN/inf")
    mean = a.mean(axis=0)
    std = np.maximum(a.std(axis=0), STD_FLOOR)
    return mean.astype(np.float32), std.astype(np.float32)
