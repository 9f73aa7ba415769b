"""Stage 0 and Stage 2 of iRe-VLA: supervised fine-tuning of LoRA + action head.

Behaviour cloning with the paper's MSE loss on the normalized action (the Gaussian's mean);
AdamW, gradient clipping, optional random-shift image augmentation, an optional auxiliary loss that
predicts the object's placement from the latent (simulation), a progress bar. Stage 0 computes the
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
from ..vla.heads import TokenLearner, mlp
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
    # (N, P) object/goal placement of each step's episode (sft.aux_placement_weight's target), NaN
    # where an episode recorded none; None when no episode did.
    placements: np.ndarray | None = None


def build_sft_data(expert: EpisodeStepDataset, online: EpisodeStepDataset | None, online_fraction: float) -> SFTData:
    parts = [expert] + ([online] if online is not None and len(online) else [])
    images = np.concatenate([p.images for p in parts])
    states = np.concatenate([p.states for p in parts])
    actions = np.concatenate([p.actions for p in parts])
    instructions = [p.instructions[e] for p in parts for e in p.episode_index]
    n_online = len(online) if online is not None else 0
    return SFTData(images, states, actions, instructions,
                   mixing_weights(len(expert), n_online, online_fraction), len(expert), n_online,
                   step_placements(parts))


def step_placements(parts: list[EpisodeStepDataset]) -> np.ndarray | None:
    """Each step's episode placement, (N, P) float32 with NaN where an episode has none (or a
    shorter one: tasks place different numbers of objects); None when no episode has one."""
    dims = [len(p) for part in parts for p in part.placements if p is not None]
    if not dims:
        return None
    out = np.full((sum(len(part) for part in parts), max(dims)), np.nan, np.float32)
    row = 0
    for part in parts:  # a part's steps are its episodes' steps, one episode after the other
        for p, n in zip(part.placements, np.bincount(part.episode_index, minlength=part.n_episodes)):
            if p is not None:
                out[row:row + n, : len(p)] = p
            row += int(n)
    return out


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


class PlacementProbe(torch.nn.Module):
    """Training-only probe: the policy's hidden states -> the normalized placement (no proprio, so
    only the latent can answer). Never saved: what it shapes is the latent (LoRA) it reads."""

    def __init__(self, feat_dim: int, out_dim: int, mean: np.ndarray, std: np.ndarray, width: int = 64):
        super().__init__()
        self.pool = TokenLearner(feat_dim, width, num_queries=4)
        self.mlp = mlp(self.pool.out_dim, 2 * width, out_dim)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(hidden, mask))

    @classmethod
    def for_data(cls, feat_dim: int, placements: np.ndarray) -> "PlacementProbe":
        mean = np.nan_to_num(np.nanmean(placements, axis=0))
        std = np.maximum(np.nan_to_num(np.nanstd(placements, axis=0)), 1e-3)  # constant coordinates -> 0
        return cls(feat_dim, placements.shape[1], mean, std)


def placement_loss(probe: PlacementProbe, hidden, mask, placements: np.ndarray) -> torch.Tensor:
    """MSE of the probe on the normalized placement, over the coordinates an episode recorded
    (1.0 = no better than predicting the mean placement)."""
    target = (torch.as_tensor(placements, device=hidden.device) - probe.mean) / probe.std
    known = torch.isfinite(target)
    if not bool(known.any()):
        return hidden.new_zeros((), dtype=torch.float32)
    err = (probe(hidden, mask) - torch.nan_to_num(target)) ** 2
    return err[known].mean()


def sft_loss(policy: VLAPolicy, images, states, actions, instructions, *, probe: PlacementProbe | None = None,
             placements: np.ndarray | None = None, aux_weight: float = 0.0, parts: dict | None = None) -> torch.Tensor:
    hidden, mask = policy.encode(images, instructions)
    # MSE on the deterministic action (the mean, or its tanh image for a SAC-trained head).
    mean = policy.deterministic_action(policy.actor(hidden, mask, policy.normalize_state(states)))
    loss = torch.nn.functional.mse_loss(mean, policy.normalize_action(actions))
    if probe is None:
        return loss
    aux = placement_loss(probe, hidden, mask, placements)
    if parts is not None:
        parts["bc"], parts["aux"] = loss.detach(), aux.detach()
    return loss + aux_weight * aux


def train_sft(policy: VLAPolicy, data: SFTData, cfg: SFTConfig, *, desc: str = "SFT",
              eval_fn=None, progress: bool = True) -> dict:
    """Trains LoRA + actor in place. Returns loss history and optional periodic eval results."""
    policy.unfreeze_lora()
    policy.actor.train()
    probe = None
    if cfg.aux_placement_weight > 0:
        if distributed.info().world_size > 1:
            raise ValueError("sft.aux_placement_weight is not supported under torchrun (set it to 0)")
        if data.placements is None or not np.isfinite(data.placements).any():
            log.warning("%s: sft.aux_placement_weight %.3g set but no episode recorded a placement "
                        "(simulation demos do): no auxiliary loss", desc, cfg.aux_placement_weight)
        else:
            torch.manual_seed(cfg.seed)
            probe = PlacementProbe.for_data(policy.backbone.hidden_size, data.placements).to(policy.device)
    opt = torch.optim.AdamW(
        [{"params": policy.head_parameters() + (list(probe.parameters()) if probe is not None else []),
          "lr": cfg.lr_head},
         {"params": policy.lora_parameters(), "lr": cfg.lr_lora}],
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=0.1 * cfg.lr_head)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [p for g in opt.param_groups for p in g["params"]]
    history, evals, aux_history = [], [], []
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
            parts: dict = {}
            with autocast(policy.device):
                loss = sft_loss(policy, images, data.states[idx], data.actions[idx],
                                [data.instructions[i] for i in idx], probe=probe,
                                placements=None if probe is None else data.placements[idx],
                                aux_weight=cfg.aux_placement_weight, parts=parts)
            global_loss = loss if probe is None else parts["bc"]
            if probe is not None:
                aux_history.append(float(parts["aux"]))
        else:
            mine = distributed.shard(np.arange(len(idx)))
            with autocast(policy.device):
                loss = ddp(images[mine], data.states[idx[mine]], data.actions[idx[mine]],
                           [data.instructions[i] for i in idx[mine]])
            global_loss = distributed.mean_across_ranks(loss)
        if not torch.isfinite(loss) or not torch.isfinite(global_loss):  # the same verdict on every rank
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
        if aux_history:
            tb.log("sft", {"aux_placement": aux_history[-1]})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.4f}", **({"aux": f"{aux_history[-1]:.3f}"} if aux_history else {}))
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            policy.eval()
            evals.append({"step": step + 1, **eval_fn(policy)})
            policy.unfreeze_lora()
            policy.actor.train()
    policy.eval()
    out = {"loss_first": float(np.mean(history[:20])), "loss_last": float(np.mean(history[-50:])),
           "loss_history": [round(v, 6) for v in history], "world_size": dist_info.world_size,
           "steps": cfg.steps, "n_expert_steps": data.n_expert, "n_online_steps": data.n_online, "evals": evals}
    if aux_history:  # the behaviour-cloning loss above; the probe's placement loss here
        out |= {"aux_placement_first": float(np.mean(aux_history[:20])),
                "aux_placement_last": float(np.mean(aux_history[-50:]))}
    return out
