"""Embeddings from transformers dual encoders (CLIP, SigLIP, SigLIP2): an on-disk FAISS index of image folders,
search by text or image, zero-shot labels, near-duplicates, and the built-in ``clip-shapes`` model.

Modules: ``encoder`` (load a dual encoder, embed images and texts), ``builtin`` (built-in encoders), ``index``
(the index folder), ``embed`` (folders into an index, resumable), ``search``, ``zeroshot`` and ``templates``,
``dedupe``, and ``shapes_eval`` / ``training`` (the built-in model's evaluation and recipe).
"""
