"""Measure what a fine-tune learned: DreamBench's subject fidelity (CLIP-I, DINO) and prompt fidelity
(CLIP-T), with confidence intervals, during training and in tools/evaluate.py.

- `formulas`: the numbers from embeddings (cosines, DreamBench's averaging, bootstrap intervals)
- `embedders`: the CLIP and DINO models through transformers, loaded lazily
- `prompts`: the shipped DreamBench-style prompt sets (prompt_sets.yaml) and how prompts are read
- `scoring`: rows of images against reference images -> Scores
- `run`: a training run's metrics.json, metrics.png, model-card table and best step
- `toy_build`: the tiny evaluation models for the toy world (committed in toy_models/)

Importing this package is cheap (no torch): recipes read the defaults below.
"""

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the CLIP DreamBench's CLIP-I / CLIP-T are usually computed with
DEFAULT_DINO = "facebook/dino-vits16"  # DreamBench's DINO: ViT-S/16 trained with DINO
METRIC_NAMES = ("clip_i", "clip_t", "dino")
