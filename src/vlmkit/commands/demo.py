"""``vlmkit demo``: the pipeline end to end on the example images shipped with vlmkit."""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import LlamaConfig, SiglipVisionConfig

EXAMPLES = "assets/examples"
CAPTION_PROMPT = "Describe the image."


def example_images() -> list[Path]:
    """The example images shipped inside the package."""
    folder = resources.files("vlmkit").joinpath(EXAMPLES)
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".png"))


def tiny_untrained_model():
    """A tiny SigLIP + Llama VLM with random weights and a tokenizer trained on the spot."""
    from vlmkit.models.compose import compose
    from vlmkit.processing.tokenizer_training import train_bpe_tokenizer

    corpus = ["There is a red circle in the top left and a small blue square in the center."] * 20
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=300)
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    lm = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return compose(vision, lm, "mlp2x_gelu", tokenizer=tokenizer)


def run(args: argparse.Namespace) -> int:
    from vlmkit.models.compose import load_pretrained, save_pretrained

    print("vlmkit demo: the built-in `default` model is not trained yet, so this demo composes a TINY UNTRAINED")
    print("model (SigLIP tower + mlp2x_gelu projector + Llama LM) and runs the model pipeline on the example images.")
    print("Its outputs are random: it shows the plumbing, not understanding.\n")
    torch.manual_seed(0)
    model, processor = tiny_untrained_model()
    model.eval()
    print(model.format_parameter_summary(), "\n")
    images = example_images()
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": CAPTION_PROMPT}],
            },
            {"role": "assistant", "content": "There is a red circle."},
        ]
        for path in images
    ]
    start = time.perf_counter()
    batch = processor(conversations, train=True)
    with torch.inference_mode():
        out = model(**batch)
    elapsed = time.perf_counter() - start
    print(
        f"{len(images)} images → batch input_ids {tuple(batch['input_ids'].shape)}, "
        f"{processor.tokens_per_image} image tokens each, loss {out.loss.item():.3f} (untrained ≈ ln(vocab) "
        f"= {torch.log(torch.tensor(float(len(processor.tokenizer)))).item():.3f}), {elapsed * 1000:.0f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, processor, tmp)
        model2, processor2 = load_pretrained(tmp)
        with torch.inference_mode():
            same = torch.equal(out.logits, model2(**processor2(conversations, train=True)).logits)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    print(f"save → load round trip: {size / 1e6:.2f} MB on disk, logits bit-identical: {same}")
    for path, row in zip(images, out.logits, strict=True):
        top = processor.decode(row[-1].topk(3).indices.tolist(), skip_special_tokens=False)
        print(f"  {path.name}: top-3 next tokens (random weights) {top!r}")
    return 0 if same else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the pipeline on the example images shipped with vlmkit")
    parser.set_defaults(func=run)
