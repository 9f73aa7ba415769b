"""The policy's camera path: a preset's vision tower is alive, and SFT's auxiliary placement loss.

Session 9 found the trained policies ignoring their camera; one cause was the preset's random init
(Blip2VisionConfig's initializer_range 1e-10: ViT features ~1e-6 and its gradients ~1e-6 of the
LM's; Q-Former queries all zero, so cross-attention is uniform and its keys get no gradient). The
first test fails on that init.
"""
from __future__ import annotations

import numpy as np
import torch

from ire_vla_ros.episodes.dataset import EpisodeStepDataset
from ire_vla_ros.episodes.store import EpisodeWriter
from ire_vla_ros.training.config import SFTConfig
from ire_vla_ros.training.sft import PlacementProbe, build_sft_data, placement_loss, train_sft
from ire_vla_ros.vla.testing import SAWYER_JOINTS, make_tiny_policy

INSTRUCTION = "press the button from the top"


def square_at(x: float, size: int = 64) -> np.ndarray:
    """A grey scene with a white 10-px square whose column follows x in [-1, 1]."""
    img = np.full((size, size, 3), 90, np.uint8)
    col = int(round((x + 1) / 2 * (size - 14))) + 2
    img[27:37, col:col + 10] = 255
    return img


def test_preset_vision_tower_responds_to_the_image():
    policy = make_tiny_policy()
    model = policy.backbone.model.base_model.model  # under the LoRA wrapper
    inputs = policy.backbone.prepare(np.stack([square_at(-0.8), square_at(0.8)]), [INSTRUCTION] * 2)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    # Features of order one (dead init: ~1e-6), and moving the square changes them visibly.
    assert float(vision.abs().mean()) > 0.1
    assert float((vision[0] - vision[1]).abs().mean()) > 0.01
    queries = model.query_tokens[0]
    assert float(queries.std(0).mean()) > 1e-3, "Q-Former queries are identical (zero init)"
    # Training can reach the image path: a loss on the LM's last hidden states (what the head reads)
    # sends the ViT's LoRA about as much gradient as the LM's (0.55x; with the 1e-10 init 3e-7x).
    policy.unfreeze_lora()
    policy.backbone.eval()
    hidden, _ = policy.encode(np.stack([square_at(-0.8), square_at(0.8)]), [INSTRUCTION] * 2)
    (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()

    def lora_grad(tower: str) -> float:
        return sum(float(p.grad.norm()) ** 2 for n, p in policy.backbone.named_parameters()
                   if "lora_B" in n and tower in n) ** 0.5

    assert lora_grad("vision_model") > 0.05 * lora_grad("language_model") > 0


def _episodes(root, placements, steps=6):
    paths = []
    rng = np.random.default_rng(0)
    for k, p in enumerate(placements):
        meta = {} if p is None else {"placement": [float(p), 0.9, 0.0]}
        w = EpisodeWriter(root, instruction=INSTRUCTION, task="button-press-topdown-v3", source="teleop",
                          action_spec=make_tiny_policy().action_spec, joint_names=SAWYER_JOINTS,
                          metadata=meta)
        for t in range(steps):
            x = 0.0 if p is None else p
            w.append(images={"main": square_at(x)}, joint_positions=np.zeros(len(SAWYER_JOINTS), np.float32),
                     action=rng.uniform(-0.5, 0.5, 4).astype(np.float32), reward=0.0, timestamp=0.1 * t)
        paths.append(w.finalize(True))
    return paths


def test_step_placements_mark_episodes_that_recorded_none(tmp_path):
    paths = _episodes(tmp_path, [0.5, None, -0.5], steps=3)
    data = build_sft_data(EpisodeStepDataset(paths), None, 0.0)
    assert data.placements.shape == (9, 3)
    assert np.allclose(data.placements[:3, 0], 0.5) and np.allclose(data.placements[6:, 0], -0.5)
    assert np.isnan(data.placements[3:6]).all()
    robot = build_sft_data(EpisodeStepDataset([paths[1]]), None, 0.0)
    assert robot.placements is None


def test_placement_loss_ignores_unlabelled_rows_and_reaches_lora():
    policy = make_tiny_policy()
    policy.unfreeze_lora()
    placements = np.array([[0.5, 0.9, 0.0], [np.nan] * 3], np.float32)
    probe = PlacementProbe.for_data(policy.backbone.hidden_size, placements)
    hidden, mask = policy.encode(np.stack([square_at(0.5), square_at(0.0)]), [INSTRUCTION] * 2)
    loss = placement_loss(probe, hidden, mask, placements)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in policy.lora_parameters())
    no_labels = placement_loss(probe, hidden.detach(), mask, np.full((2, 3), np.nan, np.float32))
    assert float(no_labels) == 0.0


def test_sft_with_the_auxiliary_loss_learns_where_the_object_is(tmp_path):
    # Actions are noise, so behaviour cloning gives the latent no reason to encode the square;
    # only the auxiliary loss does. 1.0 = the probe predicts no better than the mean placement.
    torch.manual_seed(0)
    paths = _episodes(tmp_path, list(np.linspace(-1, 1, 8)))
    data = build_sft_data(EpisodeStepDataset(paths), None, 0.0)
    policy = make_tiny_policy()
    cfg = SFTConfig(steps=150, batch_size=16, augment_shift_px=0, aux_placement_weight=1.0)
    out = train_sft(policy, data, cfg, progress=False)
    # Two of three coordinates are constant (normalized target 0): the x error is 3x the mean.
    assert out["aux_placement_first"] > 0.2
    assert out["aux_placement_last"] < 0.3 * out["aux_placement_first"]


def test_aux_weight_without_placements_trains_plain_sft(tmp_path, caplog):
    paths = _episodes(tmp_path, [None, None], steps=4)
    data = build_sft_data(EpisodeStepDataset(paths), None, 0.0)
    out = train_sft(make_tiny_policy(), data, SFTConfig(steps=3, batch_size=4, aux_placement_weight=1.0),
                    progress=False)
    assert "aux_placement_last" not in out
    assert "no episode recorded a placement" in caplog.text
