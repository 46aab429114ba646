"""Textual-inversion embeddings in the two forms the tools read.

- diffusers: `learned_embeds.safetensors` = {token: [n_vectors, dim]} (`learned_embeds_2.safetensors` for a
  second text encoder), what `pipe.load_textual_inversion(folder_or_file)` reads.
- AUTOMATIC1111 / ComfyUI: `<name>.safetensors` = {"emb_params": [n_vectors, dim]}; SDXL: {"clip_l", "clip_g"}
  (the keys come from the family's `embedding_keys`). The prompt word is the file name in those UIs; we
  also record the token in the header (`finetune.token`).

An embedding is one concept: `token` and n vectors per text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import ModelError
from finetune.export.io import read_tensors, save_safetensors

if TYPE_CHECKING:
    import torch

DEFAULT_KEYS = {"text_encoder": "emb_params"}
DIFFUSERS_NAMES = {"text_encoder": "learned_embeds.safetensors", "text_encoder_2": "learned_embeds_2.safetensors"}


@dataclass
class Embedding:
    token: str
    vectors: dict[str, torch.Tensor]  # text-encoder name -> [n_vectors, dim]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)


def _keys(family) -> dict[str, str]:
    return dict(getattr(family, "embedding_keys", None) or DEFAULT_KEYS)


def _as_token(tokens: str | list[str]) -> str:
    token = tokens if isinstance(tokens, str) else (tokens[0] if tokens else "")
    if not token:
        raise ModelError("an embedding needs a token")
    return token


def write_embedding_file(vectors: dict[str, torch.Tensor], token: str, path: Path, fmt: str,
                         meta: dict[str, str], family=None) -> Path:
    """One file: 'a1111' holds every encoder under its UI key; 'diffusers' holds the first encoder's rows."""
    meta = meta | {"finetune.token": token, "finetune.n_vectors": str(next(iter(vectors.values())).shape[0])}
    if fmt == "a1111":
        keys = _keys(family)
        missing = [n for n in vectors if n not in keys]
        if missing:
            raise ModelError(f"no A1111 embedding key for text encoder(s) {missing}")
        return save_safetensors({keys[n]: v.reshape(-1, v.shape[-1]) for n, v in vectors.items()}, path, meta)
    if fmt == "diffusers":
        name, rows = next(iter(vectors.items()))
        return save_safetensors({token: rows.reshape(-1, rows.shape[-1])}, path, meta | {"finetune.encoder": name})
    raise ModelError(f"unknown embedding format '{fmt}'; use diffusers or a1111")


def save_embeddings(vectors: dict[str, torch.Tensor], tokens: str | list[str], out_dir: str | Path, ctx,
                    formats=("diffusers", "a1111"), family=None) -> list[Path]:
    """Write the trained rows (per text encoder) in each requested format, plus the model card."""
    from finetune.export.context import common_metadata
    from finetune.export.io import DTYPES

    out_dir = Path(out_dir)
    token = _as_token(tokens)
    dtype = DTYPES[getattr(ctx, "dtype", "fp32")]
    vectors = {n: v.detach().to("cpu", dtype) for n, v in vectors.items()}
    from finetune.models.families import FAMILIES

    known = FAMILIES.get(ctx.family)
    arch = known.modelspec_arch.get(getattr(ctx, "prediction_type", "epsilon"), ctx.family) if known else ctx.family
    meta = common_metadata(ctx) | {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": ctx.name,
                                   "modelspec.architecture": f"{arch}/textual-inversion",
                                   "modelspec.trigger_phrase": token}
    written: list[Path] = []
    if "diffusers" in formats:
        for name, rows in vectors.items():
            written.append(write_embedding_file({name: rows}, token, out_dir / DIFFUSERS_NAMES[name], "diffusers",
                                                meta, family))
    if "a1111" in formats:
        written.append(write_embedding_file(vectors, token, out_dir / f"{ctx.name}.safetensors", "a1111", meta,
                                            family))
    if getattr(ctx, "model_card", False):
        from finetune.export.card import write_model_card

        written.append(write_model_card(out_dir, ctx, written, kind="embedding"))
    return written


def read_embeddings(path: str | Path, allow_pickle: bool = False, family=None, reader=read_tensors) -> Embedding:
    """Read either form (a folder means its learned_embeds*.safetensors); `reader` as in adapters.read_adapter."""
    path = Path(path)
    if path.is_dir():
        files = [path / f for f in DIFFUSERS_NAMES.values() if (path / f).is_file()]
        if not files:
            raise ModelError(f"{path}: folder holds no learned_embeds.safetensors")
        parts = [read_embeddings(f, allow_pickle, family, reader) for f in files]
        vectors = {n: v for p in parts for n, v in p.vectors.items()}
        return Embedding(parts[0].token, vectors, "diffusers", parts[0].metadata)
    tensors, meta = reader(path, allow_pickle)
    by_key = {v: k for k, v in _keys(family).items()} | {"emb_params": "text_encoder", "clip_l": "text_encoder",
                                                          "clip_g": "text_encoder_2"}
    bad = [k for k, v in tensors.items() if not hasattr(v, "dim") or v.dim() not in (1, 2)]  # torch's or header's
    if not tensors or bad:
        raise ModelError(f"{path}: not an embedding file (expected {{token: [n, dim]}} or emb_params)")
    if set(tensors) <= set(by_key):
        token = meta.get("finetune.token") or path.stem
        vectors = {by_key[k]: v.reshape(-1, v.shape[-1]) for k, v in tensors.items()}
        return Embedding(token, vectors, "a1111", meta)
    if len(tensors) != 1:
        raise ModelError(f"{path}: {len(tensors)} tensors; a diffusers embedding holds exactly one {{token: rows}}")
    token, rows = next(iter(tensors.items()))
    encoder = meta.get("finetune.encoder") or ("text_encoder_2" if path.name == DIFFUSERS_NAMES["text_encoder_2"]
                                               else "text_encoder")
    return Embedding(token, {encoder: rows.reshape(-1, rows.shape[-1])}, "diffusers", meta)


def load_into_pipeline(pipe, path: str | Path, token: str | None = None, allow_pickle: bool = False,
                       family=None) -> str:
    """Add the embedding's token(s) to the pipeline's tokenizers/encoders; returns the token to prompt with."""
    emb = read_embeddings(path, allow_pickle, family)
    token = token or emb.token
    tokenizer_for = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
    for name, rows in emb.vectors.items():
        encoder, tokenizer = getattr(pipe, name, None), getattr(pipe, tokenizer_for.get(name, ""), None)
        if encoder is None or tokenizer is None:
            raise ModelError(f"{path}: has vectors for '{name}', which this pipeline does not have")
        width = encoder.get_input_embeddings().weight.shape[1]
        if rows.shape[-1] != width:
            raise ModelError(f"{path}: vectors of width {rows.shape[-1]} do not fit '{name}' ({width}): an "
                             "embedding for another family or base")
        try:
            pipe.load_textual_inversion(rows, token=token, text_encoder=encoder, tokenizer=tokenizer)
        except ValueError as e:
            raise ModelError(f"{path}: {str(e).splitlines()[0]}") from None
    return token


def describe(emb: Embedding) -> dict:
    return {"token": emb.token, "format": emb.format,
            "vectors": {n: list(v.shape) for n, v in emb.vectors.items()},
            "trigger_words": json.loads(emb.metadata.get("finetune.trigger_words", "[]"))}
