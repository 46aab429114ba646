"""Base-model components: loading (hub id, diffusers folder, single file, toy), freezing, families."""
