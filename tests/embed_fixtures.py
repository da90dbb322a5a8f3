"""Tiny dual encoders for the embedding tests, built offline: random CLIP and SigLIP models saved to folders (then
loaded by path, the real ``from_pretrained`` route), and a colour model whose weights make its answers known."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from vlmkit.embeddings.encoder import DualEncoder
from vlmkit.processing.clip_tokenizer import train_clip_bpe

CORPUS = ["a red circle", "a blue square", "a green star", "a photo of a dog", "there is one object"] * 4
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}


@functools.cache
def tokenizer():
    return train_clip_bpe(CORPUS, vocab_size=600, model_max_length=32)


def save_clip(folder: Path) -> Path:
    """A random 2-layer CLIP (32-px images, 16-d embeddings) with its processor, saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_siglip(folder: Path) -> Path:
    """A random SigLIP (texts padded to max length, last-position pooling) with its processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class ColourModel(torch.nn.Module):
    """A dual encoder whose weights are constructed: an image's embedding is its mean normalised RGB, a text's is
    the sum of its words' rows, where "red" / "green" / "blue" point at their channel and every other word at 0."""

    def __init__(self, tok) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="colour", projection_dim=3,
                                      text_config=SimpleNamespace(max_position_embeddings=32))  # fmt: skip
        self.words = torch.nn.Embedding(len(tok), 3)
        with torch.no_grad():
            self.words.weight.zero_()
            for channel, name in enumerate(COLOURS):
                direction = torch.full((3,), -1.0)
                direction[channel] = 1.0
                self.words.weight[tok.convert_tokens_to_ids(name + "</w>")] = direction
            self.words.weight[tok.convert_tokens_to_ids("a</w>")] = 1e-3  # "a" alone: a tiny, equal vote
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))

    def get_text_features(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return (self.words(input_ids) * mask[..., None]).sum(1)


def colour_encoder() -> DualEncoder:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return DualEncoder(ColourModel(tokenizer()), processor, tokenizer(), name="colour-test", templates="simple")


def colour_image(name: str, size=(24, 20), shade: int = 0) -> Image.Image:
    r, g, b = COLOURS[name]
    return Image.new("RGB", size, (max(0, r - shade), max(0, g - shade), max(0, b - shade)))
