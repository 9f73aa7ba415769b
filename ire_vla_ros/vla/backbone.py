"""The vision-language backbone: a Hugging Face VLM whose last hidden states feed the action head.

Two ways to get one, chosen by `BackboneConfig`:
- `path`: a local directory holding a pretrained HF VLM (BLIP-2 by default, as in the paper), loaded
  with `from_pretrained(..., local_files_only=True)`; any HF image-text model whose forward returns
  hidden states can be swapped in by naming its class (`model_class`).
- `preset`: the same BLIP-2 classes (ViT, Q-Former, OPT) built from a config with random init; only
  the weights differ from a pretrained model. `tiny` (~0.4 M parameters, sized by the config's
  hidden_size/num_layers) runs the CPU demo and the tests; `small` (~30 M) is what a 2-core CPU can
  still train in a benchmark; `blip2-opt-2.7b` has the architecture numbers of the published
  Salesforce/blip2-opt-2.7b config (ViT-g/14 at 224 px, 12-layer Q-Former with 32 queries, OPT-2.7B:
  ~3.8 B parameters) for GPU benchmarks. A preset's base weights are saved inside every checkpoint,
  so a random-init model reloads exactly.

Nothing here downloads: a missing local path is an error, never a hub request.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

# CLIP statistics, what BLIP-2's image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class BackboneConfig:
    preset: str | None = "tiny"  # a key of PRESETS, or None (then `path` is required)
    path: str | None = None  # local directory of a pretrained HF VLM
    model_class: str = "Blip2ForConditionalGeneration"
    image_size: int = 64  # tiny preset only; a pretrained model's processor decides its own
    hidden_size: int = 64  # tiny preset
    num_layers: int = 2  # tiny preset, per tower
    num_query_tokens: int = 8  # tiny preset
    max_text_tokens: int = 16
    torch_dtype: str = "float32"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- tokenizer
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Word-level tokenizer for the tiny preset (a pretrained model brings its own).

    The vocabulary is fixed at construction and saved with the checkpoint; unknown words map to
    <unk>, so any instruction can be encoded.
    """

    SPECIALS = ("<pad>", "<unk>", "<bos>", "<image>")

    def __init__(self, vocab: list[str]):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        for s in self.SPECIALS:
            if s not in self.index:
                raise ValueError(f"vocabulary lacks special token {s}")
        self.pad_id = self.index["<pad>"]
        self.unk_id = self.index["<unk>"]
        self.bos_id = self.index["<bos>"]
        self.image_id = self.index["<image>"]

    @classmethod
    def build(cls, texts: list[str], size: int = 512) -> "WordTokenizer":
        words: list[str] = []
        for t in texts:
            for w in _WORD.findall(t.lower()):
                if w not in words:
                    words.append(w)
        vocab = list(cls.SPECIALS) + words
        vocab += [f"<unused{i}>" for i in range(max(0, size - len(vocab)))]
        return cls(vocab[: max(size, len(vocab))])

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.bos_id] + [self.index.get(w, self.unk_id) for w in _WORD.findall(text.lower())]
        return ids[:max_len]

    def to_json(self) -> str:
        return json.dumps({"vocab": self.vocab})

    @classmethod
    def from_json(cls, s: str) -> "WordTokenizer":
        return cls(json.loads(s)["vocab"])


# Words of the instructions the package knows about; more can be added, unknown ones become <unk>.
BASE_VOCAB_TEXT = [
    "press the button from the top", "push the button", "open the drawer", "close the drawer",
    "open the door", "close the door", "open the window", "close the window", "reach the goal",
    "pick up the object and place it at the goal", "slide the plate", "turn the faucet",
    "press the handle down", "push the puck to the goal", "pull the lever", "put the block in the box",
    "move left right up down forward backward toward away grasp release red blue green",
]


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- backbone
class VLMBackbone(nn.Module):
    """Wraps an HF VLM: (images, instructions) -> last hidden states (B, m, d) and their mask."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module, tokenizer=None, processor=None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer  # tiny preset
        self.processor = processor  # pretrained model
        text_cfg = getattr(model.config, "text_config", model.config)
        self.hidden_size = int(text_cfg.hidden_size)
        if processor is None:
            self.image_size = cfg.image_size
            self.image_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            self.image_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
            self.num_image_tokens = int(model.config.num_query_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, images: np.ndarray | list[np.ndarray], instructions: list[str]) -> dict:
        """uint8 RGB images (B,H,W,3) + strings -> model inputs on the backbone's device."""
        if self.processor is not None:
            inputs = self.processor(
                images=list(images), text=list(instructions), return_tensors="pt", padding=True
            )
            return {k: v.to(self.device) for k, v in inputs.items()}
        batch = np.stack([resize_rgb(np.asarray(im), self.image_size) for im in images])
        pixels = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        pixels = (pixels - self.image_mean.to(self.device)) / self.image_std.to(self.device)
        max_len = self.cfg.max_text_tokens
        ids = torch.full((len(instructions), self.num_image_tokens + max_len), self.tokenizer.pad_id)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(instructions):
            toks = [self.tokenizer.image_id] * self.num_image_tokens + self.tokenizer.encode(text, max_len)
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"pixel_values": pixels, "input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        lm_out = getattr(out, "language_model_outputs", None)
        hidden_states = lm_out.hidden_states if lm_out is not None else out.hidden_states
        hidden = hidden_states[-1]
        mask = inputs.get("attention_mask")
        if mask is None or mask.shape[1] != hidden.shape[1]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return hidden, mask


# Architecture numbers per preset. `blip2-opt-2.7b` follows the published Salesforce/blip2-opt-2.7b
# config.json: its vision_config and qformer_config are transformers' Blip2VisionConfig /
# Blip2QFormerConfig defaults (ViT-g/14: 1408 wide, 39 layers, 16 heads, MLP 6144, 224 px; Q-Former:
# 768 wide, 12 layers, 12 heads, MLP 3072, cross-attention every 2nd layer) and its text_config is
# facebook/opt-2.7b (2560 wide, 32 layers, 32 heads, FFN 10240, vocab 50272, 2048 positions);
# num_query_tokens 32. `tiny` reads its sizes from the BackboneConfig (hidden_size, num_layers,
# image_size, num_query_tokens) so existing checkpoints keep their shapes.
PRESETS: dict[str, dict] = {
    "small": dict(
        image_size=96, patch_size=16, vision_hidden=256, vision_layers=4, vision_heads=4, vision_mlp=1024,
        qformer_hidden=256, qformer_layers=4, qformer_heads=4, qformer_mlp=1024, num_query_tokens=16,
        text_hidden=512, text_layers=6, text_heads=8, text_ffn=2048, vocab_size=2048, max_positions=256,
    ),
    "blip2-opt-2.7b": dict(
        image_size=224, patch_size=14, vision_hidden=1408, vision_layers=39, vision_heads=16, vision_mlp=6144,
        qformer_hidden=768, qformer_layers=12, qformer_heads=12, qformer_mlp=3072, num_query_tokens=32,
        text_hidden=2560, text_layers=32, text_heads=32, text_ffn=10240, vocab_size=50272, max_positions=2048,
    ),
}
PRESET_NAMES = ("tiny",) + tuple(PRESETS)


def preset_numbers(cfg: BackboneConfig) -> dict:
    """The architecture numbers of cfg.preset (tiny: from the config's own fields)."""
    if cfg.preset == "tiny":
        h = cfg.hidden_size
        return dict(
            image_size=cfg.image_size, patch_size=8, vision_hidden=h, vision_layers=cfg.num_layers,
            vision_heads=4, vision_mlp=2 * h, qformer_hidden=h, qformer_layers=cfg.num_layers,
            qformer_heads=4, qformer_mlp=2 * h, num_query_tokens=cfg.num_query_tokens, text_hidden=h,
            text_layers=cfg.num_layers, text_heads=4, text_ffn=2 * h, vocab_size=None, max_positions=128,
        )
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {cfg.preset!r} (known: {', '.join(PRESET_NAMES)}, "
                         "or null with a path)")
    return dict(PRESETS[cfg.preset])


def preset_blip2_config(cfg: BackboneConfig, vocab_size: int):
    """A Blip2Config for cfg.preset; vocab_size is the tokenizer's (padded to the preset's size)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    n = preset_numbers(cfg)
    vision = Blip2VisionConfig(
        hidden_size=n["vision_hidden"], intermediate_size=n["vision_mlp"], num_hidden_layers=n["vision_layers"],
        num_attention_heads=n["vision_heads"], image_size=n["image_size"], patch_size=n["patch_size"],
        initializer_range=init_std(n["vision_hidden"]),
    )
    qformer = Blip2QFormerConfig(
        hidden_size=n["qformer_hidden"], intermediate_size=n["qformer_mlp"],
        num_hidden_layers=n["qformer_layers"], num_attention_heads=n["qformer_heads"],
        encoder_hidden_size=n["vision_hidden"], initializer_range=init_std(n["qformer_hidden"]),
        # tiny keeps its historical Q-Former vocabulary (the tokenizer's); the others BERT's, as published
        vocab_size=vocab_size if cfg.preset == "tiny" else 30522,
    )
    text = OPTConfig(
        hidden_size=n["text_hidden"], ffn_dim=n["text_ffn"], num_hidden_layers=n["text_layers"],
        num_attention_heads=n["text_heads"], vocab_size=vocab_size, word_embed_proj_dim=n["text_hidden"],
        max_position_embeddings=n["max_positions"], pad_token_id=0, bos_token_id=2, eos_token_id=2,
        init_std=init_std(n["text_hidden"]),
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=n["num_query_tokens"], image_token_index=3,  # WordTokenizer's <image>
        initializer_range=init_std(n["qformer_hidden"]),  # query tokens, language projection
    )


def init_std(width: int) -> float:
    """Init std of a preset tower's random weights: 1/sqrt(width).

    A preset trains from random init, and transformers' defaults assume pretrained weights get
    loaded over them: Blip2VisionConfig's initializer_range is 1e-10, which leaves the ViT's features
    at ~1e-6 and the gradient reaching its LoRA at ~3e-7 of the LM's: the image path could not
    learn, and trained policies ignored their camera (bench/bench_vision_signal.py; Stage 0 from 20
    demos 0.40 held-out on button-press and drawer-open, 0.88 / 0.93 with this init and no random
    shift, bench/results/stage0_seeing.json). The fixed 0.02 of Q-Former/OPT suits widths near
    2,500 (1/sqrt of 768-2560 is 0.036-0.020); 1/sqrt(width) keeps a layer's output the size of its
    input at any width, the 64-wide tiny towers included.
    """
    return float(width) ** -0.5


def init_query_tokens(model, std: float) -> None:
    """Random Q-Former queries for a preset: transformers initialises them to zeros (a pretrained
    BLIP-2 loads its own); zero queries attend uniformly over the image patches, the same average
    for every query, and the cross-attention's keys get no gradient."""
    with torch.no_grad():
        nn.init.trunc_normal_(model.query_tokens, mean=0.0, std=std)


def tiny_blip2_config(cfg: BackboneConfig, vocab_size: int):
    return preset_blip2_config(cfg, vocab_size)


def count_parameters(cfg: BackboneConfig) -> int:
    """Parameters of the preset's VLM, counted on the meta device (no memory, no weights)."""
    import transformers

    numbers = preset_numbers(cfg)
    vocab = numbers["vocab_size"] or len(WordTokenizer.build(BASE_VOCAB_TEXT).vocab)
    with torch.device("meta"):
        model = transformers.Blip2ForConditionalGeneration(preset_blip2_config(cfg, vocab))
    return sum(p.numel() for p in model.parameters())


def build_backbone(cfg: BackboneConfig, tokenizer_json: str | None = None) -> VLMBackbone:
    """Builds the model structure (tiny preset: random init; pretrained: weights from `path`)."""
    import transformers

    if cfg.preset is not None:
        numbers = preset_numbers(cfg)  # raises for an unknown preset
        if tokenizer_json:
            tokenizer = WordTokenizer.from_json(tokenizer_json)
        else:
            tokenizer = WordTokenizer.build(BASE_VOCAB_TEXT, size=numbers["vocab_size"] or 512)
        if numbers["image_size"] != cfg.image_size:  # the preset decides the input resolution
            cfg.image_size = numbers["image_size"]
        torch.manual_seed(cfg.seed)
        dtype = getattr(torch, cfg.torch_dtype)
        model = transformers.Blip2ForConditionalGeneration(preset_blip2_config(cfg, len(tokenizer.vocab)))
        init_query_tokens(model, init_std(numbers["qformer_hidden"]))
        if dtype != torch.float32:
            model = model.to(dtype)
        return VLMBackbone(cfg, model, tokenizer=tokenizer)
    if not cfg.path:
        raise ValueError("backbone.path is required when backbone.preset is null")
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"backbone.path {path} holds no HF model (config.json missing); weights are never downloaded "
            "at run time: put the pretrained VLM there first (e.g. huggingface-cli download on a machine "
            "with internet, then copy the directory)"
        )
    model_cls = getattr(transformers, cfg.model_class)
    model = model_cls.from_pretrained(path, local_files_only=True, dtype=getattr(torch, cfg.torch_dtype))
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    return VLMBackbone(cfg, model, processor=processor)
