"""Gradient checkpointing (a stage's ``gradient_checkpointing: true``): the same loss and gradients, with the
activations of the LM and of a training tower recomputed in the backward pass."""

from __future__ import annotations

import torch

from conftest import compose_tiny, solid_image
from vlmkit.training.config import PolicySpec, StageConfig
from vlmkit.training.model import apply_policy, set_gradient_checkpointing


def _batch(processor):
    samples = [
        processor.encode(
            [{"role": "user", "content": f"<image>\nWhat colour is it? ({i})"},
             {"role": "assistant", "content": "red" if i else "a blue square"}],
            [solid_image((200, 30 * i, 30))], train=True,
        )
        for i in range(3)
    ]  # fmt: skip
    return processor.collate(samples)


def _loss_and_grads(model, batch, on: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    stage = StageConfig(policy=PolicySpec(vision="full", projector="full", language_model="full"),
                        gradient_checkpointing=on)  # fmt: skip
    apply_policy(model, stage)
    set_gradient_checkpointing(model, stage)
    model.train()
    calls = []
    lm_mlp = model.language_model.model.layers[0].mlp
    tower_mlp = next(m for m in model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer").mlp
    # a pre-hook: the recomputation stops as soon as the saved tensors are back, before the module's forward ends
    hooks = [m.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
             for name, m in (("lm", lm_mlp), ("tower", tower_mlp))]  # fmt: skip
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    loss = model(**inputs, labels=batch["labels"], supervised_loss=True)["loss_sum"]
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, calls.count("lm") + calls.count("tower")


def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes():
    torch.manual_seed(0)
    model, processor = compose_tiny()
    batch = _batch(processor)
    loss, grads, forwards = _loss_and_grads(model, batch, on=False)
    loss_gc, grads_gc, forwards_gc = _loss_and_grads(model, batch, on=True)
    assert forwards == 2 and forwards_gc == 4  # each checkpointed layer ran again in the backward pass
    assert loss_gc == loss
    assert grads_gc.keys() == grads.keys() and any(n.startswith("vision_tower") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, rtol=0, atol=1e-7, msg=name)
    # and off again: no recomputation
    _, _, forwards_off = _loss_and_grads(model, batch, on=False)
    assert forwards_off == 2
