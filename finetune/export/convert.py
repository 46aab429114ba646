"""Format conversions: LoRA diffusers <-> kohya, embeddings diffusers <-> AUTOMATIC1111.

Tensors are copied, not recomputed, so a round trip is bit-for-bit; the one exception is a LoKr whose two
Kronecker factors are both full, where the kohya file bakes peft's alpha/r into lokr_w1 (see kohya.py).
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import ModelError

KEPT_PREFIXES = ("finetune.", "ss_", "modelspec.")


def kept_metadata(meta: dict[str, str]) -> dict[str, str]:
    """The story a converted file keeps: our keys and the UI keys (format-specific configs are rebuilt)."""
    from finetune.export.layers import PEFT_META

    return {k: v for k, v in meta.items() if k.startswith(KEPT_PREFIXES) and k != PEFT_META}


def lora_target(src: Path, dst: Path, fmt: str) -> Path:
    """Where a conversion writes: a kohya .safetensors file, or a diffusers folder (or .safetensors file)."""
    if fmt not in ("diffusers",) and dst.suffix != ".safetensors":
        dst = dst / f"{src.stem if src.is_file() else src.name}.safetensors"
    if dst.resolve() == src.resolve():
        raise ModelError(f"{dst}: is the input file; choose another output")
    return dst


def check_lora_output(target: Path, inputs, overwrite: bool = False) -> Path:
    """`target` (from lora_target) when every file a LoRA written there would take is free: not an input, and
    not an existing file unless `overwrite` (a diffusers folder gets one of two file names, by adapter kind)."""
    from finetune.export.io import check_output
    from finetune.export.layers import DIFFUSERS_FILE, PEFT_FILE

    files = [target] if target.suffix == ".safetensors" else [target / DIFFUSERS_FILE, target / PEFT_FILE]
    for path in files:
        check_output(path, inputs, overwrite)
    return target


def convert_lora(src: str | Path, dst: str | Path, fmt: str, allow_pickle: bool = False, family=None,
                 overwrite: bool = False) -> Path:
    """Rewrite a LoRA/DoRA/LoHa/LoKr file as 'kohya', 'diffusers' or a family's own layout ('bfl' for FLUX);
    returns the written path. An existing output is replaced only with `overwrite`; an input never."""
    from finetune.export.adapters import read_adapter
    from finetune.export.lora import family_layouts, save_adapter

    src, dst = Path(src), Path(dst)
    target = check_lora_output(lora_target(src, dst, fmt), [src], overwrite)
    adapter = read_adapter(src, allow_pickle=allow_pickle, family=family)
    if family is None:
        from finetune.models.families import FAMILIES

        family = FAMILIES[adapter.family or "sd1"]
    if fmt not in ("kohya", "diffusers", *family_layouts(family)):
        more = "".join(f", {f}" for f in family_layouts(family))
        raise ModelError(f"unknown LoRA format '{fmt}' for a {family.name} LoRA; use kohya or diffusers{more}")
    meta = kept_metadata(adapter.metadata)
    meta["finetune.converted_from"] = f"{adapter.format}:{adapter.path.name}"
    return save_adapter(adapter, target, fmt, meta, family)


def convert_embedding(src: str | Path, dst: str | Path, fmt: str, allow_pickle: bool = False,
                      family=None, overwrite: bool = False) -> Path:
    """Rewrite a textual-inversion file as 'a1111' (emb_params / clip_l+clip_g) or 'diffusers' ({token: rows})."""
    from finetune.export.embeddings import read_embeddings, write_embedding_file
    from finetune.export.io import check_output, safe_stem

    src, dst = Path(src), Path(dst)
    emb = read_embeddings(src, allow_pickle=allow_pickle, family=family)
    if dst.suffix != ".safetensors":
        # the token comes from the input file: a downloaded embedding must not choose where we write
        stem = safe_stem(emb.token, f"{src}: the embedding's token") if fmt == "a1111" else "learned_embeds"
        dst = dst / f"{stem}.safetensors"
    check_output(dst, [src], overwrite)
    meta = kept_metadata(emb.metadata) | {"finetune.converted_from": f"{emb.format}:{src.name}"}
    return write_embedding_file(emb.vectors, emb.token, dst, fmt, meta, family)
