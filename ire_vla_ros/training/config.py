"""Hyperparameters: one dataclass per stage, all overridable from one YAML file in config/."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from .sac import SACConfig


@dataclass
class EnvConfig:
    image_size: int = 64
    camera: str = "corner"
    max_episode_steps: int = 150  # policy decisions per episode
    action_repeat: int = 1  # physics steps (12.5 ms each) per decision


@dataclass
class PolicyHParams:
    head_width: int = 128
    head_queries: int = 4
    init_log_std: float = -1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    backbone: dict = field(default_factory=lambda: {"preset": "tiny", "hidden_size": 64, "num_layers": 2})


@dataclass
class CollectConfig:
    episodes_per_task: int = 20
    noise_std: float = 0.1
    seed0: int = 0


@dataclass
class SFTConfig:
    steps: int = 1500
    batch_size: int = 64
    lr_head: float = 1e-3
    lr_lora: float = 5e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Expected share of online (successful RL) steps in each batch in Stage 2; expert data fills the rest.
    online_fraction: float = 0.5
    # Random-shift augmentation (DrQ), pixels; 0 disables. Off by default: a shift moves where the
    # object appears, and on a fixed camera that is what says where to reach. On the 64-px sim
    # views the placements span ~6 px, and a 4-px shift kept Stage 0 at 0.40 / 0.38 held-out on
    # button-press / drawer-open (20 demos) against 0.88 / 0.93 without it. Use it for cameras
    # that move, or with images where the placement range spans many times the shift.
    augment_shift_px: int = 0
    eval_every: int = 0  # steps between in-training evaluations; 0 = only at the end
    # Auxiliary loss (simulation): predict the episode's object/goal placement (metadata
    # "placement", written by the sim collector) from the VLM's last hidden states, through a
    # training-only probe. Behaviour cloning with proprioception learns the demos' average path and
    # ignores the camera (bench/results/stage0_vision_checks.json); this makes the latent, which
    # Stage 1 trains on frozen, carry where the object is. 0 = off; episodes without a placement
    # (robot data) add no auxiliary term.
    aux_placement_weight: float = 0.0
    seed: int = 0


@dataclass
class PPOConfig:
    """Stage 1: PPO on the action head (and a fresh critic) with the VLM frozen."""

    total_env_steps: int = 16_384
    num_envs: int = 8  # environments stepped in lock-step; the backbone runs once per step for all
    rollout_len: int = 128  # steps per env per update -> batch = num_envs * rollout_len
    update_epochs: int = 8
    minibatch_size: int = 256
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    anneal_lr: bool = True  # linear decay to 0 over Stage 1, as CleanRL does by default
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.03
    norm_adv: bool = True
    reward: str = "sparse"  # "sparse": 1 on success (the paper); "dense": Metaworld's shaped reward
    dense_reward_scale: float = 0.1
    # Reward on the success step, which ends the episode. None: 1 with sparse reward; with dense
    # reward, the discounted return of holding Metaworld's maximum step reward (10) forever. Any
    # less and finishing the task would cost reward: measured, PPO then learned to hover next to
    # the button instead of pressing it (success 0.42 -> 0.00).
    success_bonus: float | None = None
    init_log_std: float = -1.0  # exploration noise (normalized action units) set at the start of Stage 1
    # The critic starts fresh: for the first rollouts only it trains (actor untouched), so the
    # first policy updates do not follow the advantages of a random value function.
    critic_warmup_rollouts: int = 2
    freeze_backbone: bool = True  # False only for the ablation (full-model PPO)
    keep_successful: bool = True  # write successful rollouts to the episode store for Stage 2
    seed: int = 0


def success_bonus(cfg: PPOConfig) -> float:
    if cfg.success_bonus is not None:
        return float(cfg.success_bonus)
    if cfg.reward == "dense":
        return 10.0 * cfg.dense_reward_scale / (1.0 - cfg.gamma)
    return 1.0


STAGE1_ALGOS = ("sac", "ppo")


@dataclass
class Stage1Config:
    """Which RL algorithm Stage 1 runs: "sac" (SAC from demonstrations on cached latents, the
    paper's real-robot recipe; `sac:` section) or "ppo" (the paper's sim recipe; `ppo:` section)."""

    algo: str = "sac"

    def __post_init__(self):
        if self.algo not in STAGE1_ALGOS:
            raise ValueError(f"stage1.algo must be one of {STAGE1_ALGOS}, got {self.algo!r}")


@dataclass
class EvalConfig:
    episodes_per_task: int = 20
    seed_offset: int = 10_000  # held-out placements: training uses seeds below this
    videos: bool = True


@dataclass
class IterateConfig:
    tasks: list[str] = field(default_factory=lambda: ["button-press-topdown-v3", "drawer-close-v3"])
    iterations: int = 1
    seed: int = 0
    device: str = "auto"
    torch_threads: int = 2
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyHParams = field(default_factory=PolicyHParams)
    collect: CollectConfig = field(default_factory=CollectConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    stage2_sft: SFTConfig | None = None  # defaults to `sft` when unset
    stage1: Stage1Config = field(default_factory=Stage1Config)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sac: SACConfig = field(default_factory=SACConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data: dict, where: str):
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    kwargs = {}
    for key, value in data.items():
        default = getattr(cls(), key) if key != "stage2_sft" else SFTConfig()
        if is_dataclass(default) and value is not None:
            kwargs[key] = _build(type(default), value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, default, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, default, where: str):
    """YAML reads '3e-4' as a string (1.1 wants '3.0e-4'): convert to the field's type."""
    if isinstance(default, bool) or value is None or default is None:
        return value
    if isinstance(default, (int, float)) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError as e:
            raise ValueError(f"{where}: expected a number, got {value!r}") from e
        if isinstance(default, int):
            if not number.is_integer():
                raise ValueError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    return value


def load_iterate_config(path: str | Path | None = None, overrides: dict | None = None) -> IterateConfig:
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return _build(IterateConfig, data, str(path or "config"))


def parse_override(text: str) -> tuple[str, object]:
    """'ppo.lr_actor=3e-4' -> ('ppo.lr_actor', 0.0003) (value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
