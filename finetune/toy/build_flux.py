"""The FLUX-shaped toy base: architecture, text encoders, VAE variant and the diffusers folder.

Everything that fixes a shape lives here, so tests (and the FLUX family's tests) can build the same
model with random weights (`random_flux_pipeline`) without training anything. Training is in
`build_flux_train.py`; `tools/make_toy_model.py --flux` runs both. Build-time only: nothing here runs
when the committed base is loaded with a stock `FluxPipeline`.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import torch

from finetune.export.io import replace_folder
from finetune.toy import toy_base_path, world

# 64 px images -> the toy VAE's 16x16x4 latents -> FluxPipeline packs 2x2 patches: 8x8 = 64 tokens of 16.
LATENT_CHANNELS = 4
# inner dim 128 = 4 heads x 32. The rotary axes (batch/frame, row, column) must sum to the head dim;
# 12 dims per spatial axis give six frequencies, enough to tell 8 rows apart unambiguously.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=LATENT_CHANNELS * 4,
    num_layers=2,  # double-stream (MMDiT) blocks: text and image keep separate weights
    num_single_layers=4,  # single-stream blocks: one sequence, parallel attention + MLP
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,  # the toy T5's d_model
    pooled_projection_dim=64,  # the toy CLIP's hidden size (pooler_output)
    # No guidance embedding: FLUX.1-dev's is learned by distilling a CFG teacher, which the CPU budget
    # does not afford, and an untrained guidance input would either do nothing or break at the
    # pipeline's default 3.5. The toy is trained with caption dropout and sampled with true CFG
    # (`true_cfg_scale` + `negative_prompt`), which FluxPipeline supports; it is schnell-shaped here.
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
MAX_SEQUENCE_LENGTH = 32  # T5 tokens; toy prompts are under 16, and the model is trained at exactly 32
T5_CONFIG = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# The SD toy's VAE latents are standardised per channel inside the VAE. Here they are refolded so that
# the raw latents have mean SHIFT and std 1 / SCALE, exactly what FLUX's (z - shift) * scale undoes:
# a trainer or sampler that forgets the shift is off by half a standard deviation, which shows.
VAE_SHIFT_FACTOR = 1.0
VAE_SCALING_FACTOR = 0.5
# Dynamic (resolution-dependent) shift as FLUX.1-dev, with the toy's native 64 px (64 tokens) as the
# base resolution: mu = base_shift there (sigma shift e^0.5 = 1.65), growing for larger toy images.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=1.0,  # unused with dynamic shifting; 1.0 so that no hidden static shift applies
    use_dynamic_shifting=True,
    base_image_seq_len=64,
    max_image_seq_len=1024,
    base_shift=0.5,
    max_shift=1.15,
)
# How the committed base is sampled (written to toy_build.json and docs/toy.md).
SAMPLER = dict(steps=28, guidance=5.0)

_EXTRA_WORDS = ("photo", "picture", "image", "of", "an", "the", "in", "with", "and", "style")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?-'\"():;<>_/"


# ---------------------------------------------------------------------------------------------- T5 side
def t5_vocabulary() -> list[tuple[str, float]]:
    """Unigram pieces: T5's special tokens, every toy-world word, then single characters.

    Whole words score far above characters, so a known word is one token and an unknown one (a
    trigger like 'sks') falls apart into characters, as real T5 splits rare words into pieces.
    """
    words = set(_EXTRA_WORDS)
    for colour in [*world.COLOURS, *world.SUBJECT_COLOURS]:
        for shape in [*world.SHAPES, "heart"]:
            for bg in world.BACKGROUNDS:
                for r in (12, 16, 22):
                    words.update(w.strip(",") for c in world.caption_variants(colour, shape, bg, r) for w in c.split())
    for subj in world.SUBJECTS.values():
        words.update([subj.description, subj.class_word, subj.pattern])
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -4.0) for w in sorted(words)]
    vocab += [("▁", -6.0)] + [(c, -8.0) for c in _CHARS]
    return vocab


def make_t5_tokenizer():
    """A T5TokenizerFast (Unigram + Metaspace, `</s>` appended) over the toy vocabulary, built offline."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def make_t5_encoder(vocab_size: int, seed: int = 0):
    """Random T5 encoder, frozen: like the toy CLIP, it only has to map prompts to distinct states."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    enc = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG))
    return enc.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- CLIP + VAE
def load_toy_clip(source: pathlib.Path | None = None):
    """The SD toy's frozen random CLIP text encoder and its real-CLIP-BPE tokenizer, unchanged."""
    from transformers import CLIPTextModel, CLIPTokenizer

    source = source or toy_base_path()
    te = CLIPTextModel.from_pretrained(source / "text_encoder", dtype=torch.float32)
    return te.eval().requires_grad_(False), CLIPTokenizer.from_pretrained(source / "tokenizer")


@torch.no_grad()
def refold_vae(vae, shift: float = VAE_SHIFT_FACTOR, scale: float = VAE_SCALING_FACTOR):
    """Turn the standardised toy VAE into one whose raw latents are z_std / scale + shift.

    Exact: quant_conv (encoder side) maps to the new latents, post_quant_conv (decoder side) maps
    them back, and the posterior's log-variance moves by -2 log(scale). Sets the config to match,
    so `(vae.encode(x) - shift_factor) * scaling_factor` is the standardised latent again.
    """
    c = vae.config.latent_channels
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= scale
    q.bias[:c] = q.bias[:c] / scale + shift
    q.bias[c:] -= 2 * math.log(scale)
    pq.bias -= scale * shift * pq.weight[:, :, 0, 0].sum(dim=1)
    pq.weight *= scale
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def make_vae(source: pathlib.Path | None = None):
    """The SD toy's VAE, refolded for FLUX's shift + scale and rounded through fp16 (it ships in fp16)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained((source or toy_base_path()) / "vae", torch_dtype=torch.float32)
    return refold_vae(vae).half().float().eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- pipeline
def make_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def text_components(seed: int = 0) -> dict:
    """CLIP + T5 encoders and tokenizers of the FLUX toy (the T5 part random from `seed`)."""
    clip, clip_tok = load_toy_clip()
    t5_tok = make_t5_tokenizer()
    t5 = make_t5_encoder(len(t5_tok), seed)
    return dict(text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok)


def random_flux_pipeline(seed: int = 0):
    """The FLUX toy's exact shapes with an untrained transformer (plumbing tests, no learning)."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        transformer=make_transformer(seed),
        vae=make_vae(),
        scheduler=make_scheduler(),
        **text_components(seed),
    )


def folder_size_mb(path: pathlib.Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _name_t5_tokenizer_fast(folder: pathlib.Path) -> None:
    """transformers 5 saves the T5 tokenizer as `T5Tokenizer` (its fast one, renamed); transformers 4 reads
    that name as the sentencepiece tokenizer and finds no spiece.model. FLUX repos say T5TokenizerFast,
    which both versions load from tokenizer.json."""
    for name, key in (("model_index.json", None), ("tokenizer_2/tokenizer_config.json", "tokenizer_class")):
        cfg = json.loads((folder / name).read_text())
        if key is None:
            cfg["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
        else:
            cfg[key] = "T5TokenizerFast"
        (folder / name).write_text(json.dumps(cfg, indent=2) + "\n")


def save_flux_pipeline(out: pathlib.Path, parts: dict, info: dict) -> float:
    """Write the FluxPipeline folder atomically (temp folder, then rename); returns its size in MB.

    The transformer and the CLIP ship in fp16 (the CLIP already was, the transformer was trained in
    fp32 and EMA-averaged, so fp16 rounding is far below its error); T5 stays fp32, as T5 in fp16
    is known to overflow. The CLIP tokenizer ships as vocab.json + merges.txt like the SD toy's.
    """
    import copy

    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        transformer=copy.deepcopy(parts["transformer"]).half(),
        vae=copy.deepcopy(parts["vae"]).half(),
        text_encoder=copy.deepcopy(parts["text_encoder"]).half(),
        tokenizer=parts["tokenizer"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=parts["tokenizer_2"],
        scheduler=make_scheduler(),
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tok_dir = tmp / "tokenizer"
    shutil.rmtree(tok_dir)
    tok_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(toy_base_path() / "tokenizer" / name, tok_dir / name)
    _name_t5_tokenizer_fast(tmp)
    (tmp / "toy_build.json").write_text(json.dumps(info, indent=2) + "\n")
    replace_folder(tmp, out)
    return folder_size_mb(out)
