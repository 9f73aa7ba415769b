"""VLAPolicy: VLM backbone (+LoRA) -> token-learner Gaussian action head, plus a critic.

The policy works in a normalized action space (zero mean, unit std over the expert data); the
statistics live in buffers saved with the checkpoint, and `act()` returns actions in the
environment's units, clipped to the action spec.

Two ways to map the head's Gaussian onto the bounded action box (`PolicyConfig.action_squash`):
- "clip" (Stage 0 and PPO): the head's output is the mean action; a sample beyond a bound is
  clipped, and `log_prob` accounts for the clipping (tail mass).
- "tanh" (SAC): the head's output u is pre-squash; the action is c + h * tanh(u) with c, h the
  centre and half-width of the normalized box, and `log_prob` is the change-of-variables density
  of y = tanh(u) in the unit box (the coordinates SAC's target entropy -|A|/2 refers to).
  The deterministic action is c + h * tanh(mean): the per-dimension median of the squashed
  distribution (tanh is monotone), and what Stage 0/2's MSE fits (`deterministic_action`).
  So Stage 2 regresses the policy's median action onto the demonstrated one and leaves the
  exploration noise (log_std) untouched; SAC changes both.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .action_spec import ActionSpec
from .backbone import BackboneConfig, VLMBackbone, build_backbone
from .heads import CriticHead, GaussianActionHead


ACTION_SQUASH = ("clip", "tanh")
HEAD_SNAPSHOT_FORMAT = "ire_vla_head/1"


class HeadSnapshotError(ValueError):
    """A head snapshot that does not fit this policy (shapes, keys, format) or cannot be read."""


@dataclass
class PolicyConfig:
    backbone: BackboneConfig
    action_spec: ActionSpec
    joint_names: list[str]
    head_width: int = 128
    head_queries: int = 4
    init_log_std: float = -1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # "all-linear" for the tiny preset (random init needs capacity everywhere); for a pretrained
    # BLIP-2 use the language model's attention, e.g. ".*language_model.*\\.(q_proj|v_proj)".
    lora_target_modules: str | list[str] = "all-linear"
    action_squash: str = "clip"  # "clip" (Stage 0, PPO) or "tanh" (SAC): see the module docstring
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.action_squash not in ACTION_SQUASH:
            raise ValueError(f"action_squash must be one of {ACTION_SQUASH}, got {self.action_squash!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["action_spec"] = self.action_spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        d = dict(d)
        d["backbone"] = BackboneConfig.from_dict(d["backbone"])
        d["action_spec"] = ActionSpec.from_dict(d["action_spec"])
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class ActResult:
    action: np.ndarray  # environment units, clipped, float32
    log_prob: float  # of the executed (clipped) action under the current policy, see VLAPolicy.log_prob
    value: float
    normalized_action: np.ndarray


@dataclass
class BatchAct:
    actions: np.ndarray  # (B, A) env units
    normalized: np.ndarray  # (B, A) the sample, normalized space
    log_probs: np.ndarray  # (B,)
    values: np.ndarray  # (B,)
    hidden: torch.Tensor  # (B, m, d) frozen features, for the rollout buffer
    mask: torch.Tensor  # (B, m)


class VLAPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, backbone: VLMBackbone | None = None, tokenizer_json: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone, tokenizer_json)
        self._add_lora()
        a_dim, s_dim, d = cfg.action_spec.dim, len(cfg.joint_names), self.backbone.hidden_size
        self.actor = GaussianActionHead(d, s_dim, a_dim, cfg.head_width, cfg.head_queries, cfg.init_log_std)
        self.critic = CriticHead(d, s_dim, cfg.head_width, cfg.head_queries)
        self.register_buffer("action_mean", torch.zeros(a_dim))
        self.register_buffer("action_std", torch.ones(a_dim))
        self.register_buffer("state_mean", torch.zeros(s_dim))
        self.register_buffer("state_std", torch.ones(s_dim))
        self._action_low = torch.tensor(cfg.action_spec.low, dtype=torch.float32)
        self._action_high = torch.tensor(cfg.action_spec.high, dtype=torch.float32)
        self._graphed_backbone = None  # vla/cuda_graph.GraphedForward once enable_cuda_graphs() ran

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=self.cfg.lora_dropout,
            target_modules=self.cfg.lora_target_modules, bias="none",
        )
        self.backbone.model = get_peft_model(self.backbone.model, lora)

    # ------------------------------------------------------------------ properties
    @property
    def action_spec(self) -> ActionSpec:
        return self.cfg.action_spec

    @property
    def joint_names(self) -> list[str]:
        return list(self.cfg.joint_names)

    @property
    def device(self) -> torch.device:
        return self.action_mean.device

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if "lora_" in n]

    # ------------------------------------------------------------------ normalization
    def set_normalization(self, action_mean, action_std, state_mean, state_std) -> None:
        for name, value in (("action_mean", action_mean), ("action_std", action_std),
                            ("state_mean", state_mean), ("state_std", state_std)):
            t = torch.as_tensor(np.asarray(value, np.float32), device=self.device)
            if t.shape != getattr(self, name).shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(t)

    def normalize_state(self, states) -> torch.Tensor:
        s = torch.as_tensor(np.asarray(states, np.float32), device=self.device)
        return (s - self.state_mean) / self.state_std

    def normalize_action(self, actions) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(actions, np.float32), device=self.device)
        return (a - self.action_mean) / self.action_std

    def unnormalize_action(self, a_norm: torch.Tensor) -> torch.Tensor:
        a = a_norm * self.action_std + self.action_mean
        return torch.maximum(torch.minimum(a, self._action_high.to(a.device)), self._action_low.to(a.device))

    # ------------------------------------------------------------------ backbone freezing
    def freeze_backbone(self) -> None:
        """Stage 1: the VLM (base + LoRA) takes no gradient and runs in eval mode."""
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze_lora(self) -> None:
        """Stage 0/2: LoRA weights and the whole action head train, the base VLM weights stay fixed."""
        self.actor.requires_grad_(True)  # Stage 1 may have frozen the head's token learner
        self.backbone.requires_grad_(False)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        self.backbone.train()

    def reset_critic(self, seed: int | None = None) -> None:
        """Fresh critic at the start of every Stage 1 (as the paper does)."""
        if seed is not None:
            torch.manual_seed(seed)
        self.critic = CriticHead(self.backbone.hidden_size, len(self.cfg.joint_names),
                                 self.cfg.head_width, self.cfg.head_queries).to(self.device)

    # ------------------------------------------------------------------ forward paths
    def encode(self, images, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (B, m, d) + mask; gradients flow only if LoRA is trainable.

        On CUDA the backbone runs under bf16 autocast (fp16 on GPUs without bf16), on CPU in fp32
        (vla/precision.py); the heads cast the features back to fp32.
        """
        inputs = self.backbone.prepare(images, instructions)
        graphed = self._graphed_backbone
        if graphed is not None and not torch.is_grad_enabled() and not self.backbone.training:
            return graphed(inputs)
        return self._backbone_forward(inputs)

    def _backbone_forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from .precision import autocast

        with autocast(self.device):
            return self.backbone(inputs)

    def enable_cuda_graphs(self) -> bool:
        """Inference calls of encode() (no grad, backbone in eval) replay the backbone from a CUDA
        graph (vla/cuda_graph.py: the step is launch-bound on a GPU). False (and nothing changes)
        off CUDA. Training calls stay eager; graphs follow in-place weight loads."""
        if self.device.type != "cuda":
            return False
        from .cuda_graph import GraphedForward

        self._graphed_backbone = GraphedForward(self._backbone_forward)
        return True

    def warm_up(self) -> None:
        """One act on a blank observation. With CUDA graphs enabled this captures the graph now (e.g.
        in a loader thread before the policy is swapped in) instead of at the first control step
        (0.43 s for blip2-opt-2.7b on an H100: several control periods)."""
        size = int(getattr(self.backbone, "image_size", 224))
        self.act(np.zeros((size, size, 3), np.uint8), np.zeros(len(self.cfg.joint_names), np.float32), "")

    def disable_cuda_graphs(self) -> None:
        self._graphed_backbone = None

    @property
    def cuda_graph_status(self) -> str:
        """off | ready (no graph yet) | graphs=N | eager: <capture error>"""
        g = self._graphed_backbone
        if g is None:
            return "off"
        if g.failure is not None:
            return f"eager: {g.failure}"
        return f"graphs={g.num_graphs}" if g.num_graphs else "ready"

    def distribution(self, hidden, mask, state_n) -> torch.distributions.Normal:
        return self.actor.distribution(hidden, mask, state_n)

    def normalized_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        low = (self._action_low.to(self.device) - self.action_mean) / self.action_std
        high = (self._action_high.to(self.device) - self.action_mean) / self.action_std
        return low, high

    def squash_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre c and half-width h of the normalized action box: a_n = c + h * y, y in [-1, 1]."""
        low, high = self.normalized_bounds()
        return (high + low) / 2, (high - low) / 2

    def deterministic_action(self, head_out: torch.Tensor) -> torch.Tensor:
        """The head's output -> the normalized action executed without noise (what SFT's MSE fits)."""
        if self.cfg.action_squash == "tanh":
            c, h = self.squash_box()
            return c + h * torch.tanh(head_out)
        return head_out

    def squashed_sample(self, dist: torch.distributions.Normal) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized sample of the tanh policy: (normalized action, log-prob in the unit box)."""
        u = dist.rsample()
        c, h = self.squash_box()
        return c + h * torch.tanh(u), squashed_log_prob(dist, u)

    def log_prob(self, dist: torch.distributions.Normal, a_n: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of a normalized action under this policy's squash (see module docstring)."""
        if self.cfg.action_squash == "tanh":
            c, h = self.squash_box()
            y = ((a_n - c) / h).clamp(-1 + 1e-6, 1 - 1e-6)
            return squashed_log_prob(dist, torch.atanh(y))
        return self.clipped_log_prob(dist, a_n)

    def clipped_log_prob(self, dist: torch.distributions.Normal, a_n: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of the action the robot executes, summed over dimensions.

        Actions are clipped to the action spec before execution, so a sample beyond a bound
        executes as the bound: its probability is the Gaussian tail mass, not the density
        (clipped action policy gradient, Fujita & Maeda 2018). Expert actions sit on the bounds
        often (Metaworld's scripted policies saturate), and with the plain density PPO would
        follow noise in dimensions whose change the robot never sees.
        """
        low, high = self.normalized_bounds()
        z_low = (low - dist.mean) / dist.stddev
        z_high = (high - dist.mean) / dist.stddev
        inside = dist.log_prob(a_n)
        below = torch.special.log_ndtr(z_low)  # P(sample <= low)
        above = torch.special.log_ndtr(-z_high)  # P(sample >= high)
        lp = torch.where(a_n <= low, below, torch.where(a_n >= high, above, inside))
        return lp.sum(-1)

    def value(self, hidden, mask, state_n) -> torch.Tensor:
        return self.critic(hidden, mask, state_n)

    @torch.no_grad()
    def act_batch(self, images, states, instructions: list[str], deterministic: bool) -> BatchAct:
        hidden, mask = self.encode(images, instructions)
        state_n = self.normalize_state(states)
        dist = self.distribution(hidden, mask, state_n)
        if self.cfg.action_squash == "tanh":
            u = dist.mean if deterministic else dist.sample()
            a_n = self.deterministic_action(u)
            log_prob = squashed_log_prob(dist, u)
        else:
            a_n = dist.mean if deterministic else dist.sample()
            log_prob = self.log_prob(dist, a_n)
        value = self.value(hidden, mask, state_n)
        actions = self.unnormalize_action(a_n)
        # .float(): a caller under autocast gets bf16/fp16 head outputs, which numpy cannot hold
        return BatchAct(
            actions=actions.float().cpu().numpy(), normalized=a_n.float().cpu().numpy(),
            log_probs=log_prob.float().cpu().numpy(), values=value.float().cpu().numpy(), hidden=hidden, mask=mask,
        )

    def act(self, image: np.ndarray, state: np.ndarray, instruction: str, *, deterministic: bool = True) -> ActResult:
        """One observation -> one action (what the policy node calls every control tick)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        state = np.asarray(state, np.float32)
        if state.shape != (len(self.cfg.joint_names),):
            raise ValueError(f"state must have {len(self.cfg.joint_names)} joint positions, got shape {state.shape}")
        out = self.act_batch(image[None], state[None], [instruction], deterministic)
        return ActResult(action=out.actions[0], log_prob=float(out.log_probs[0]), value=float(out.values[0]),
                         normalized_action=out.normalized[0])

    # ------------------------------------------------------------------ head snapshots (online RL)
    def head_tensors(self) -> dict[str, torch.Tensor]:
        """Actor head + normalization: everything a head snapshot carries (no critic, no VLM)."""
        out = {f"actor.{k}": v for k, v in self.actor.state_dict().items()}
        out |= {f"norm.{b}": getattr(self, b) for b in ("action_mean", "action_std", "state_mean", "state_std")}
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}

    def save_head_snapshot(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Atomically writes the actor head + normalization as one safetensors file.

        temp file in the same directory, fsync, rename, fsync the directory: a reader sees the
        old file or the new one, never half of one.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format": HEAD_SNAPSHOT_FORMAT, "action_squash": self.cfg.action_squash,
                "metadata": json.dumps(metadata or {}, default=str)}
        try:
            save_file(self.head_tensors(), str(tmp), metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def load_head_snapshot(self, path: str | Path) -> dict:
        """Swaps in an actor head (and normalization) without touching the backbone.

        Every tensor is checked against this policy's shapes before anything is copied, so a
        snapshot that does not fit leaves the policy as it was (HeadSnapshotError). Safetensors
        only. Returns the snapshot's metadata dict.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise HeadSnapshotError(f"{path}: unreadable head snapshot ({type(e).__name__}: {e})") from e
        if header.get("format") != HEAD_SNAPSHOT_FORMAT:
            raise HeadSnapshotError(f"{path}: format {header.get('format')!r}, expected {HEAD_SNAPSHOT_FORMAT!r}")
        squash = header.get("action_squash")
        if squash not in ACTION_SQUASH:
            raise HeadSnapshotError(f"{path}: action_squash {squash!r} not one of {ACTION_SQUASH}")
        own = self.head_tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise HeadSnapshotError(f"{path}: keys do not fit this policy (missing {missing[:3]}, unexpected {unexpected[:3]})")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise HeadSnapshotError(f"{path}: {k} has shape {tuple(v.shape)}, this policy expects {tuple(own[k].shape)}")
            if not torch.isfinite(v).all():
                raise HeadSnapshotError(f"{path}: {k} holds non-finite values")
        with torch.no_grad():
            self.actor.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("actor.")})
            self.set_normalization(*(tensors[f"norm.{b}"] for b in ("action_mean", "action_std", "state_mean", "state_std")))
        self.cfg.action_squash = squash
        try:
            return json.loads(header.get("metadata", "{}"))
        except json.JSONDecodeError:
            return {}


def squashed_log_prob(dist: torch.distributions.Normal, u: torch.Tensor) -> torch.Tensor:
    """log density of y = tanh(u), u ~ dist, summed over dimensions (change of variables).

    log p(y) = log N(u) - sum log(1 - tanh(u)^2), with log(1 - tanh(u)^2) written as
    2 * (log 2 - u - softplus(-2u)) so it stays finite where tanh saturates.
    """
    log_det = 2.0 * (np.log(2.0) - u - torch.nn.functional.softplus(-2.0 * u))
    return (dist.log_prob(u) - log_det).sum(-1)
