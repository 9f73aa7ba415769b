"""VLAPolicy: VLM backbone (+LoRA) -> token-learner Gaussian action head, plus a critic.

The policy works in a normalized action space (zero mean, unit std over the expert data); the
statistics live in buffers saved with the checkpoint, and `act()` returns actions in the
environment's units, clipped to the action spec.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .action_spec import ActionSpec
from .backbone import BackboneConfig, VLMBackbone, build_backbone
from .heads import CriticHead, GaussianActionHead


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
    extra: dict = field(default_factory=dict)

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
        """Stage 0/2: LoRA weights train, the base VLM weights stay fixed."""
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
        """Backbone features (B, m, d) + mask; gradients flow only if LoRA is trainable."""
        return self.backbone(self.backbone.prepare(images, instructions))

    def distribution(self, hidden, mask, state_n) -> torch.distributions.Normal:
        return self.actor.distribution(hidden, mask, state_n)

    def normalized_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        low = (self._action_low.to(self.device) - self.action_mean) / self.action_std
        high = (self._action_high.to(self.device) - self.action_mean) / self.action_std
        return low, high

    def log_prob(self, dist: torch.distributions.Normal, a_n: torch.Tensor) -> torch.Tensor:
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
        a_n = dist.mean if deterministic else dist.sample()
        log_prob = self.log_prob(dist, a_n)
        value = self.value(hidden, mask, state_n)
        actions = self.unnormalize_action(a_n)
        return BatchAct(
            actions=actions.cpu().numpy().astype(np.float32), normalized=a_n.cpu().numpy().astype(np.float32),
            log_probs=log_prob.cpu().numpy(), values=value.cpu().numpy(), hidden=hidden, mask=mask,
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
