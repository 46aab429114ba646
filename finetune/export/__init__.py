"""The one place that writes model files: safetensors only, written atomically, with metadata."""
