"""The VLA model and its checkpoints: real tiny BLIP-2 + LoRA + token-learner heads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ire_vla_ros.vla.action_spec import EE_DELTA_7D, METAWORLD_4D
from ire_vla_ros.vla.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from ire_vla_ros.vla.testing import SAWYER_JOINTS, make_tiny_policy

IMG = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
STATE = np.linspace(-1, 1, 9).astype(np.float32)
TEXT = "press the button from the top"


def test_act_returns_clipped_env_action_logprob_and_value():
    policy = make_tiny_policy()
    policy.set_normalization(np.zeros(4), np.full(4, 50.0), np.zeros(9), np.ones(9))  # huge std -> clipping
    torch.manual_seed(0)
    res = policy.act(IMG, STATE, TEXT, deterministic=False)
    assert res.action.shape == (4,) and res.action.dtype == np.float32
    assert np.all(np.abs(res.action) <= 1.0)
    assert np.isfinite(res.log_prob) and np.isfinite(res.value)


def test_act_rejects_wrong_inputs():
    policy = make_tiny_policy()
    with pytest.raises(ValueError, match="uint8"):
        policy.act(IMG.astype(np.float32), STATE, TEXT)
    with pytest.raises(ValueError, match="9 joint positions"):
        policy.act(IMG, STATE[:5], TEXT)


def test_instruction_and_image_change_the_features():
    policy = make_tiny_policy()
    h1, _ = policy.encode(IMG[None], [TEXT])
    h2, _ = policy.encode(IMG[None], ["open the drawer"])
    h3, _ = policy.encode((255 - IMG)[None], [TEXT])
    assert not torch.allclose(h1, h2) and not torch.allclose(h1, h3)


def test_lora_is_on_the_backbone_and_freeze_stops_its_gradients():
    policy = make_tiny_policy()
    lora = policy.lora_parameters()
    assert lora, "LoRA adapters expected on the backbone"
    base = [p for n, p in policy.backbone.named_parameters() if "lora_" not in n]
    policy.unfreeze_lora()
    assert all(p.requires_grad for p in lora) and not any(p.requires_grad for p in base)
    policy.freeze_backbone()
    assert not any(p.requires_grad for p in policy.backbone.parameters())
    assert not policy.backbone.training
    assert all(p.requires_grad for p in policy.head_parameters())


def test_checkpoint_round_trip_is_exact(tmp_path):
    policy = make_tiny_policy(action_spec=EE_DELTA_7D, joint_names=[f"j{i}" for i in range(6)])
    with torch.no_grad():
        for p in policy.lora_parameters():
            p.add_(0.01)  # LoRA B starts at zero: make the adapter matter
    policy.set_normalization(np.arange(7) * 0.1, np.ones(7) * 0.3, np.zeros(6), np.ones(6) * 2)
    ckpt = save_checkpoint(policy, tmp_path, stage="sft", iteration=3, metadata={"note": "x"})
    assert resolve_checkpoint(tmp_path) == ckpt
    loaded = load_checkpoint(tmp_path)
    state = np.zeros(6, np.float32)
    a = policy.act(IMG, state, TEXT).action
    b = loaded.act(IMG, state, TEXT).action
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert loaded.action_spec == EE_DELTA_7D and loaded.joint_names == [f"j{i}" for i in range(6)]
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["stage"] == "sft" and meta["iteration"] == 3 and meta["note"] == "x"
    assert not list(tmp_path.glob(".tmp-*")), "temporary directory left behind"


def test_latest_pointer_moves_only_after_complete_write(tmp_path):
    first = save_checkpoint(make_tiny_policy(), tmp_path, stage="sft", iteration=0)
    second = save_checkpoint(make_tiny_policy(seed=1), tmp_path, stage="rl", iteration=1)
    assert resolve_checkpoint(tmp_path) == second != first


@pytest.mark.parametrize("victim", ["heads.safetensors", "lora_adapter/adapter_model.safetensors", "backbone_base.safetensors"])
def test_truncated_checkpoint_is_refused_with_a_clear_error(tmp_path, victim):
    ckpt = save_checkpoint(make_tiny_policy(), tmp_path, stage="sft", iteration=0)
    data = (ckpt / victim).read_bytes()
    (ckpt / victim).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ckpt)


def test_corrupted_bytes_are_refused(tmp_path):
    ckpt = save_checkpoint(make_tiny_policy(), tmp_path, stage="sft", iteration=0)
    f = ckpt / "heads.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ckpt)


def test_mismatched_shapes_are_refused(tmp_path):
    ckpt = save_checkpoint(make_tiny_policy(), tmp_path / "a", stage="sft", iteration=0)
    other = save_checkpoint(make_tiny_policy(action_spec=EE_DELTA_7D), tmp_path / "b", stage="sft", iteration=0)
    # Graft the 7-D heads into the 4-D checkpoint and fix the manifest: shapes must still be checked.
    (ckpt / "heads.safetensors").write_bytes((other / "heads.safetensors").read_bytes())
    from ire_vla_ros.vla import checkpoint as ck

    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["heads.safetensors"] = {"size": (ckpt / "heads.safetensors").stat().st_size,
                                     "sha256": ck._sha256(ckpt / "heads.safetensors")}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt)


def test_missing_checkpoint_and_dangling_latest(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("gone\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path)


def test_pretrained_backbone_path_must_exist_locally(tmp_path):
    from ire_vla_ros.vla.backbone import BackboneConfig, build_backbone

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_backbone(BackboneConfig(preset=None, path=str(tmp_path / "blip2")))


def test_pretrained_backbone_loads_from_a_local_directory(tmp_path):
    """The real from_pretrained path: a tiny BLIP-2 saved to disk with its processor, loaded back."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ire_vla_ros.vla.backbone import BackboneConfig, WordTokenizer, build_backbone, tiny_blip2_config

    wt = WordTokenizer.build([TEXT])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(wt.vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = BackboneConfig(preset="tiny", image_size=64)
    model = Blip2ForConditionalGeneration(tiny_blip2_config(cfg, len(fast)))
    model.config.image_token_index = fast.convert_tokens_to_ids("<image>")
    model.save_pretrained(tmp_path / "blip2")
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=fast,
                          num_query_tokens=cfg.num_query_tokens)
    proc.save_pretrained(tmp_path / "blip2")
    bb = build_backbone(BackboneConfig(preset=None, path=str(tmp_path / "blip2")))
    hidden, mask = bb(bb.prepare(IMG[None], [TEXT]))
    assert hidden.shape[0] == 1 and hidden.shape[-1] == 64 and mask.shape == hidden.shape[:2]
