"""Stage 0 and Stage 2 of iRe-VLA: supervised fine-tuning of LoRA + action head.

Behaviour cloning with the paper's MSE loss on the normalized action (the Gaussian's mean);
AdamW, gradient clipping, random-shift image augmentation, a progress bar. Stage 0 computes the
action/state normalization from the expert data; Stage 2 keeps the model's statistics (changing
them would silently shift what the head outputs) and mixes expert and successful online episodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..episodes.dataset import EpisodeStepDataset, mixing_weights
from ..vla.policy import VLAPolicy
from ..vla.precision import autocast
from . import distributed
from . import tb
from .config import SFTConfig

log = logging.getLogger(__name__)


@dataclass
class SFTData:
    images: np.ndarray  # (N, H, W, 3) uint8
    states: np.ndarray  # (N, S)
    actions: np.ndarray  # (N, A) env units
    instructions: list[str]  # per step
    weights: torch.Tensor  # sampling weight per step (expert/online mix)
    n_expert: int
    n_online: int


def build_sft_data(expert: EpisodeStepDataset, online: EpisodeStepDataset | None, online_fraction: float) -> SFTData:
    parts = [expert] + ([online] if online is not None and len(online) else [])
    images = np.concatenate([p.images for p in parts])
    states = np.concatenate([p.states for p in parts])
    actions = np.concatenate([p.actions for p in parts])
    instructions = [p.instructions[e] for p in parts for e in p.episode_index]
    n_online = len(online) if online is not None else 0
    return SFTData(images, states, actions, instructions,
                   mixing_weights(len(expert), n_online, online_fraction), len(expert), n_online)


def set_normalization_from(policy: VLAPolicy, data: SFTData) -> None:
    a, s = data.actions[: data.n_expert], data.states[: data.n_expert]
    policy.set_normalization(a.mean(0), np.maximum(a.std(0), 1e-3), s.mean(0), np.maximum(s.std(0), 1e-3))


def random_shift(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """DrQ-style augmentation: pad by replication and crop back at a random offset."""
    if pad <= 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.empty_like(images)
    dx, dy = rng.integers(0, 2 * pad + 1, size=(2, n))
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def sft_loss(policy: VLAPolicy, images, states, actions, instructions) -> torch.Tensor:
    hidden, mask = policy.encode(images, instructions)
    # MSE on the deterministic action (the mean, or its tanh image for a SAC-trained head).
    mean = policy.deterministic_action(policy.actor(hidden, mask, policy.normalize_state(states)))
    return torch.nn.functional.mse_loss(mean, policy.normalize_action(actions))


def train_sft(policy: VLAPolicy, data: SFTData, cfg: SFTConfig, *, desc: str = "SFT",
              eval_fn=None, progress: bool = True) -> dict:
    """Trains LoRA + actor in place. Returns loss history and optional periodic eval results."""
    policy.unfreeze_lora()
    policy.actor.train()
    opt = torch.optim.AdamW(
        [{"params": policy.head_parameters(), "lr": cfg.lr_head},
         {"params": policy.lora_parameters(), "lr": cfg.lr_lora}],
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=0.1 * cfg.lr_head)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [p for g in opt.param_groups for p in g["params"]]
    history, evals = [], []
    # Under torchrun: DDP over LoRA + head; every rank draws the same global batch (same seeded
    # generators) and trains on its shard, so the weighted expert/online sampling is unchanged.
    ddp = distributed.wrap_for_training(policy, sft_loss)
    dist_info = distributed.info()
    if cfg.batch_size % dist_info.world_size:
        raise ValueError(f"sft.batch_size {cfg.batch_size} must divide by the {dist_info.world_size} processes")
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress or not dist_info.is_main, mininterval=2.0)
    running = None
    for step in bar:
        idx = torch.multinomial(data.weights, cfg.batch_size, replacement=True, generator=gen).numpy()
        images = random_shift(data.images[idx], cfg.augment_shift_px, rng)
        if ddp is None:
            with autocast(policy.device):
                loss = sft_loss(policy, images, data.states[idx], data.actions[idx],
                                [data.instructions[i] for i in idx])
            global_loss = loss
        else:
            mine = distributed.shard(np.arange(len(idx)))
            with autocast(policy.device):
                loss = ddp(images[mine], data.states[idx[mine]], data.actions[idx[mine]],
                           [data.instructions[i] for i in idx[mine]])
            global_loss = distributed.mean_across_ranks(loss)
        if not torch.isfinite(global_loss):  # the same verdict on every rank
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        loss_value = global_loss.item()
        running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
        history.append(loss_value)
        tb.log("sft", {"loss": loss_value, "lr_head": opt.param_groups[0]["lr"], "lr_lora": opt.param_groups[1]["lr"]})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            policy.eval()
            evals.append({"step": step + 1, **eval_fn(policy)})
            policy.unfreeze_lora()
            policy.actor.train()
    policy.eval()
    return {"loss_first": float(np.mean(history[:20])), "loss_last": float(np.mean(history[-50:])),
            "loss_history": [round(v, 6) for v in history], "world_size": dist_info.world_size,
            "steps": cfg.steps, "n_expert_steps": data.n_expert, "n_online_steps": data.n_online, "evals": evals}
