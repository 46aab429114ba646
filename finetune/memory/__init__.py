"""Memory before the run: `finetune estimate RECIPE` (finetune/memory/estimate.py) sizes a recipe's peak
accelerator memory from the base's configs, built on the meta device (no weights read, nothing allocated)."""
