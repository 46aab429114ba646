"""The reference bases at their real shapes: the published configs of SD 1.5, SDXL, SD 3.5 Medium / Large,
FLUX.1 [dev] / [schnell], Qwen-Image, Z-Image-Turbo, FLUX.2 [klein] 4B / 9B, FLUX.2 [dev], Chroma1-HD, Lumina-Image
2.0, Sana 1600M, Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B / TI2V 5B and HunyuanImage 2.1 (finetune/models/configs/) built on the meta
device, no weights, and every quantity that depends on real shapes checked against the published checkpoints and
the pipelines' own code: parameter counts, image tokens and the resolution-shift mu at 512 / 768 / 1024 px and
at non-square buckets (Wan: video tokens of 480p x 81-frame clips), caption tokens per variant, which weights
stay fp32 after our casts, LoRA target counts per preset with their kohya / ComfyUI / BFL key counts, and
`finetune estimate`'s weight bytes (every expert of Wan 2.2 A14B)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest
import torch

from tests.published import CARDS, PUBLISHED, QWEN3_CARDS, SD35_LARGE_MINUS_MEDIUM

FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux1-dev": "flux",
          "flux1-schnell": "flux", "qwen-image": "qwen_image", "z-image-turbo": "z_image",
          "flux2-klein-4b": "flux2_klein", "flux2-klein-9b": "flux2_klein", "chroma1-hd": "chroma",
          "flux2-dev": "flux2_dev", "lumina-image-2": "lumina2", "sana-1600m-1024px": "sana",
          "wan2.1-1.3b": "wan", "wan2.1-14b": "wan", "wan2.2-a14b": "wan",
          "wan2.2-5b": "wan", "hunyuanimage-2.1": "hunyuanimage"}
WAN = [name for name, family in FAMILY.items() if family == "wan"]
FLOW = [name for name, family in FAMILY.items() if family not in ("sd1", "sdxl", "wan")]  # image flow families
SIZES = [(512, 512), (768, 768), (1024, 1024), (832, 1216), (1216, 832), (1344, 768)]  # (height, width)


def hub_id(name: str) -> str:
    from finetune.models.reference import REFERENCE_IDS

    return next(hub for hub, n in REFERENCE_IDS.items() if n == name)


def fresh(name: str):
    """The reference base on the meta device, frozen, as `finetune estimate` builds it."""
    from finetune.memory.skeleton import meta_components
    from finetune.models.base import resolve_base

    return meta_components(resolve_base(hub_id(name)))


@functools.cache
def shared(name: str):
    """The same, built once per test session, for the tests that only read it."""
    return fresh(name)


def scheduler(name: str):
    """The flow-matching grid a run trains on: the base's sampler through the family (Sana: its DPM-Solver's
    flow_shift; the others' FlowMatch scheduler as published)."""
    import json

    import diffusers

    from finetune.models.families import FAMILIES
    from finetune.models.reference import reference_folder

    folder = reference_folder(name)
    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["scheduler"][1])
    return FAMILIES[FAMILY[name]].training_scheduler(cls.from_pretrained(folder / "scheduler"))


@pytest.mark.parametrize("name", list(FAMILY))
def test_published_configs_are_the_published_models(name):
    """Each component's parameter count is the published checkpoint's; the family is detected from the
    configs alone."""
    from finetune.models.detect import family_of_folder
    from finetune.models.reference import reference_folder

    comps = shared(name)
    assert family_of_folder(reference_folder(name)).name == comps.family.name == FAMILY[name]
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in comps.named_modules().items()}
    if name in WAN:  # Wan 2.2 A14B: two experts of the 14B shape, split at the published boundary
        experts = ["transformer", "transformer_2"] if name == "wan2.2-a14b" else ["transformer"]
        assert list(comps.experts) == experts and counts["transformer"] == counts[experts[-1]]
    for component, published in PUBLISHED.get(name, {}).items():
        assert counts[component] == published, (name, component)
    for component, (billions, decimals) in CARDS.get(name, {}).items():
        assert round(counts[component] / 1e9, decimals) == billions, (name, component, counts[component])
    if name in QWEN3_CARDS:  # the Qwen3 encoders: total and non-embedding, to the model card's precision
        total, body, half_digit = QWEN3_CARDS[name]
        enc = comps.text_encoders[0]
        head = enc.get_output_embeddings()
        embeds = enc.get_input_embeddings().weight.numel()
        embeds += head.weight.numel() if head is not None and not enc.config.tie_word_embeddings else 0
        assert round(counts["text_encoder"] / 1e9, 1) == total
        assert abs((counts["text_encoder"] - embeds) / 1e9 - body) < half_digit


def test_sd35_large_and_medium_differ_as_published():
    def size(m):
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())

    assert size(shared("sd35-large").denoiser) - size(shared("sd35-medium").denoiser) == SD35_LARGE_MINUS_MEDIUM


class _Denoiser:
    """Stands in for the transformer: records what the family's `predict` gives it, returns zeros shaped
    like its input (the packing and unpacking around it are the family's own)."""

    def __init__(self, config):
        self.config, self.seen = config, None

    def __call__(self, *args, **kwargs):
        self.seen = kwargs.get("hidden_states", args[0] if args else None)
        zero = [torch.zeros_like(x) for x in self.seen] if isinstance(self.seen, list) else torch.zeros_like(self.seen)
        return (zero,)


def our_tokens(comps, text, height: int, width: int) -> tuple[int, torch.Tensor]:
    """(image tokens the denoiser gets, our latents) for one image through `encode_latents` and `predict`."""
    from finetune.memory.trace import meta_safe

    family, den = comps.family, _Denoiser(dict(comps.denoiser.config))
    with torch.no_grad(), meta_safe():
        latents = family.encode_latents(comps.vae, torch.zeros(1, 3, height, width, device="meta"))
        out = family.predict(den, latents, torch.full((1,), 500.0, device="meta"), text, {})
    assert out.shape == latents.shape  # the prediction comes back in the latents' layout
    x = den.seen[0] if isinstance(den.seen, list) else den.seen
    if x.ndim == 3:  # packed tokens [B, N, C]
        return x.shape[1], latents
    patch = den.config.get("patch_size") or den.config["all_patch_size"][0]  # SD3 / Z-Image patch inside
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch  # HunyuanImage: (1, 1)
    return (x.shape[-2] // patch) * (x.shape[-1] // patch), latents


def pipeline_tokens(pipe, height: int, width: int) -> int:
    """Image tokens as the stock pipeline's `__call__` counts them: its own `prepare_latents`."""
    packs = type(pipe).__name__ in ("FluxPipeline", "QwenImagePipeline", "Flux2KleinPipeline", "ChromaPipeline",
                                    "Flux2Pipeline")
    channels = pipe.transformer.config.in_channels // (4 if packs else 1)  # num_channels_latents, as __call__
    out = pipe.prepare_latents(1, channels, height, width, torch.float32, torch.device("meta"), None)
    latents = out[0] if isinstance(out, tuple) else out
    if latents.ndim == 3:  # packed
        return latents.shape[1]
    p = pipe.transformer.config.get("patch_size") or 2  # SD3, Lumina 2 and Z-Image count 2x2 patches; Sana 1x1
    p = p[-1] if isinstance(p, (list, tuple)) else p  # HunyuanImage: (1, 1)
    return (latents.shape[-2] // p) * (latents.shape[-1] // p)


@pytest.mark.parametrize("name", FLOW)
def test_image_tokens_and_resolution_shift_are_the_pipelines(name):
    """At 512 / 768 / 1024 px and non-square buckets: the denoiser sees as many image tokens as the pipeline
    makes, and the resolution-shift mu is the pipeline's (`calculate_shift` over the base's scheduler config;
    FLUX.2 [klein]'s pipeline shifts by an empirical, step-dependent mu instead: ours is FLUX.1's rule, by
    choice), or the run uses the base's static shift where its pipeline does (SD 3.5, Z-Image)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from finetune.memory.trace import meta_safe
    from finetune.sections import TrainSection
    from finetune.train.objectives import build_objective

    comps, sched = shared(name), scheduler(name)
    objective = build_objective(comps.family, sched, TrainSection())
    pipe, c = comps.pipeline(scheduler=sched), sched.config
    with torch.no_grad(), meta_safe():
        text = comps.family.encode_prompt(comps, ["a photo"], "meta")
    for height, width in SIZES:
        tokens, latents = our_tokens(comps, text, height, width)
        side = 32 if comps.family.name in ("sana", "hunyuanimage") else 16  # the 32x DC-AE / VAE, patch 1
        assert tokens == pipeline_tokens(pipe, height, width) == (height // side) * (width // side)
        if objective.resolution_shift:
            mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
            assert abs(objective.mu(latents) - mu) < 1e-9, (name, height, width)
    if not objective.resolution_shift:  # the static grid the pipeline samples on (SD 3.5, Z-Image: shift 3; Sana:
        # the flow_shift 3 its DPM-Solver samples with; HunyuanImage 2.1: 5)
        static = 5.0 if comps.family.name == "hunyuanimage" else 3.0
        assert not c.use_dynamic_shifting and objective.scheduler.config.shift == c.shift == static
    else:
        # [schnell]: see docs/families.md; Lumina 2's pipeline computes FLUX's mu, but its scheduler shifts
        # statically (6): ours follows sd-scripts' 'nextdit_shift' (finetune/models/families/lumina2.py)
        assert c.use_dynamic_shifting or name in ("flux1-schnell", "lumina-image-2")


#: (frames, height, width) -> video tokens (latent frames x latent rows x latent columns after the 2x2 patch):
#: 480p x 81 frames on the 8x VAE (21 x 30 x 52), the TI2V 5B's 16x VAE at 480p and at its 704 x 1280 x 121
WAN_TOKENS = {"wan2.1": {(81, 480, 832): 21 * 30 * 52, (33, 832, 480): 9 * 52 * 30},
              "wan2.2-5b": {(81, 480, 832): 21 * 15 * 26, (121, 704, 1280): 31 * 22 * 40}}


@pytest.mark.parametrize("name", WAN)
def test_wan_clip_tokens_are_the_pipelines(name):
    """A clip's latents through our `encode_latents` (the meta VAE) have the shape WanPipeline's own
    `prepare_latents` makes for that clip, and the transformer sees the published token counts."""
    from diffusers import UniPCMultistepScheduler

    from finetune.memory.trace import meta_safe
    from finetune.models.reference import reference_folder

    comps = shared(name)
    pipe = comps.pipeline(scheduler=UniPCMultistepScheduler.from_pretrained(reference_folder(name) / "scheduler"))
    den = _Denoiser(dict(comps.denoiser.config))
    with torch.no_grad(), meta_safe():
        text = comps.family.encode_prompt(comps, ["a cat"], "meta")
        for (frames, height, width), tokens in WAN_TOKENS["wan2.2-5b" if name == "wan2.2-5b" else "wan2.1"].items():
            latents = comps.family.encode_latents(comps.vae, torch.zeros(1, 3, frames, height, width, device="meta"))
            ref = pipe.prepare_latents(1, comps.denoiser.config.in_channels, height, width, frames, torch.float32,
                                       torch.device("meta"))
            assert latents.shape == ref.shape, (name, frames, height, width)
            out = comps.family.predict(den, latents, torch.full((1,), 500.0, device="meta"), text, {})
            _, p_t, p_h, p_w = (1, *comps.denoiser.config.patch_size)
            f, h, w = den.seen.shape[2:]
            assert out.shape == latents.shape and (f // p_t) * (h // p_h) * (w // p_w) == tokens


#: caption tokens per variant: SD3 joins CLIP's 77 to T5's; [schnell] was trained with 256 T5 tokens
CAPTION_TOKENS = {"sd15": 77, "sdxl": 77, "sd35-medium": 77 + 256, "sd35-large": 77 + 256, "flux1-schnell": 256,
                  "hunyuanimage-2.1": 1000}  # HunyuanImagePipeline.tokenizer_max_length (its __call__ takes none)
PIPELINES = {"flux": "FluxPipeline", "qwen_image": "QwenImagePipeline", "z_image": "ZImagePipeline",
             "flux2_klein": "Flux2KleinPipeline", "sd3": "StableDiffusion3Pipeline", "chroma": "ChromaPipeline",
             "flux2_dev": "Flux2Pipeline", "lumina2": "Lumina2Pipeline", "sana": "SanaPipeline", "wan": "WanPipeline",
             "hunyuanimage": "HunyuanImagePipeline"}


@pytest.mark.parametrize("name", list(FAMILY))
def test_caption_tokens_and_width_per_variant(name):
    """The text conditioning's length is the variant's (the pipeline's default max_sequence_length, [schnell]
    256) and its width what the denoiser reads (cross_attention_dim, joint_attention_dim, cap_feat_dim)."""
    import diffusers

    from finetune.memory.trace import meta_safe

    comps = shared(name)
    with torch.no_grad(), meta_safe():
        text = comps.family.encode_prompt(comps, ["a photo of a cat"], "meta")
    length = CAPTION_TOKENS.get(name)
    if length is None:
        call = getattr(diffusers, PIPELINES[comps.family.name]).__call__
        length = inspect.signature(call).parameters["max_sequence_length"].default
    if comps.family.name == "sd3":
        assert inspect.signature(diffusers.StableDiffusion3Pipeline.__call__).parameters[
            "max_sequence_length"].default == 256
    c = comps.denoiser.config
    width = (c.get("caption_channels") or c.get("cross_attention_dim") or c.get("joint_attention_dim")  # Sana: caption_
             or c.get("cap_feat_dim") or c.get("text_dim") or c.get("text_embed_dim"))  # channels (Gemma's width;
    # it projects to 2240 itself)
    assert tuple(text["prompt_embeds"].shape) == (1, length, width)


@pytest.mark.parametrize("name", list(FAMILY))
def test_weights_kept_in_fp32_after_our_cast(name):
    """After the trainer's cast only what transformers keeps in fp32 at that dtype stays fp32: T5-XXL's (and
    Wan's UMT5-XXL's) 24 `wo` in fp16 (SD 3.5, FLUX.1, Chroma, Wan), nothing in bf16 and nothing in the other
    families; Wan's transformer keeps what diffusers keeps in fp32 at every dtype."""
    from finetune.models.components import cast_frozen

    comps = fresh(name)
    t5 = next((e for e in comps.text_encoders if type(e).__name__ in ("T5EncoderModel", "UMT5EncoderModel")), None)
    for dtype in (torch.float16, torch.bfloat16):  # fp16 first: bf16 then casts T5's wo down as transformers does
        cast_frozen(comps, dtype, dtype)
        fp32 = [f"{c}.{n}" for c, m in comps.named_modules().items() for n, p in m.named_parameters()
                if p.dtype == torch.float32]
        if comps.family.name == "wan":  # diffusers keeps Wan's time embedder, modulation tables and cross-attention
            # norms in fp32 in any dtype (_keep_in_fp32_modules): 1 + 4 outside the blocks, 3 in each
            den = [n for n in fp32 if n.startswith(tuple(comps.experts))]
            parts = {"time_embedder", "scale_shift_table", "norm2"}
            assert all(parts & set(n.split(".")) for n in den)
            assert len(den) == len(comps.experts) * (5 + 3 * comps.denoiser.config.num_layers), (name, len(den))
            fp32 = [n for n in fp32 if n not in den]
        if t5 is not None and dtype == torch.float16:  # T5-XXL's 24; HunyuanImage's byT5-small glyph encoder's 12
            assert len(fp32) == t5.config.num_layers == (12 if comps.family.name == "hunyuanimage" else 24)
            assert all(n.endswith("layer.1.DenseReluDense.wo.weight") for n in fp32), fp32[:3]
        else:
            assert fp32 == [], (name, dtype)


def _per_block(c, **n):
    return sum(n.get(k, 0) * c[k] for k in ("num_layers", "num_single_layers"))


#: (family, preset) -> adapted modules from the denoiser config (how many of each block kind the preset takes)
TARGETS = {
    ("flux", "attention"): lambda c: _per_block(c, num_layers=8, num_single_layers=3),
    ("flux", "attention_mlp"): lambda c: _per_block(c, num_layers=12, num_single_layers=3),
    ("flux", "all_linear"): lambda c: _per_block(c, num_layers=12, num_single_layers=5),
    ("flux", "all_linear_mod"): lambda c: _per_block(c, num_layers=14, num_single_layers=6),
    # HunyuanImage 2.1: FLUX's block modules (its presets keep out of the token refiner in front of the blocks)
    ("hunyuanimage", "attention"): lambda c: _per_block(c, num_layers=8, num_single_layers=3),
    ("hunyuanimage", "all_linear"): lambda c: _per_block(c, num_layers=12, num_single_layers=5),
    ("hunyuanimage", "all_linear_mod"): lambda c: _per_block(c, num_layers=14, num_single_layers=6),
    # Chroma: FLUX's blocks without modulation linears
    ("chroma", "attention"): lambda c: _per_block(c, num_layers=8, num_single_layers=3),
    ("chroma", "attention_mlp"): lambda c: _per_block(c, num_layers=12, num_single_layers=3),
    ("chroma", "all_linear"): lambda c: _per_block(c, num_layers=12, num_single_layers=5),
    **{(f, "attention"): lambda c: _per_block(c, num_layers=8) for f in ("flux2_klein", "flux2_dev")},
    **{(f, "attention_mlp"): lambda c: _per_block(c, num_layers=12) for f in ("flux2_klein", "flux2_dev")},
    **{(f, "all_linear"): lambda c: _per_block(c, num_layers=12, num_single_layers=2)
       for f in ("flux2_klein", "flux2_dev")},
    # Lumina 2: every joint layer and both refiners' layers
    ("lumina2", "attention"): lambda c: 4 * (c["num_layers"] + 2 * c["num_refiner_layers"]),
    ("lumina2", "attention_mlp"): lambda c: 7 * (c["num_layers"] + 2 * c["num_refiner_layers"]),
    # Sana: the linear self-attention and the cross-attention (4 each), + the 2 pointwise convolutions
    ("sana", "attention"): lambda c: 8 * c["num_layers"],
    ("sana", "attention_mlp"): lambda c: 10 * c["num_layers"],
    # SD3's last block is context_pre_only (no to_add_out, no ff_context); SD 3.5 Medium's first 13 blocks add
    # a second image attention (attn2: to_q/k/v/out.0)
    ("sd3", "attention"): lambda c: 8 * c["num_layers"] - 1 + 4 * len(c["dual_attention_layers"]),
    ("sd3", "attention_mlp"): lambda c: 12 * c["num_layers"] - 3 + 4 * len(c["dual_attention_layers"]),
    # the last block's text stream never reaches the output and is left out (Family.unused_modules)
    ("qwen_image", "attention"): lambda c: 8 * c["num_layers"] - 1,
    ("qwen_image", "attention_mlp"): lambda c: 12 * c["num_layers"] - 3,
    # main layers and both refiners
    ("z_image", "attention"): lambda c: 4 * (c["n_layers"] + 2 * c["n_refiner_layers"]),
    ("z_image", "attention_mlp"): lambda c: 7 * (c["n_layers"] + 2 * c["n_refiner_layers"]),
    # U-Nets: 16 (SD 1.5) / 70 (SDXL) transformer blocks (8 attention + 2 feed-forward linears each) in 16 / 11
    # Transformer2DModels (proj_in, proj_out), 22 / 17 resnets (conv1, conv2, time_emb_proj) of which 14 / 11
    # change width (conv_shortcut)
    ("sd1", "attention"): lambda c: 8 * 16, ("sd1", "attention_ff"): lambda c: 10 * 16 + 2 * 16,
    ("sd1", "locon"): lambda c: 10 * 16 + 2 * 16 + 3 * 22 + 14,
    ("sdxl", "attention"): lambda c: 8 * 70, ("sdxl", "attention_ff"): lambda c: 10 * 70 + 2 * 11,
    ("sdxl", "locon"): lambda c: 10 * 70 + 2 * 11 + 3 * 17 + 11,
    # Wan: self- and cross-attention q / k / v / o per block (+ the image keys / values of I2V, none in T2V),
    # and the feed-forward's two linears
    ("wan", "attention"): lambda c: 8 * c["num_layers"], ("wan", "attention_ffn"): lambda c: 10 * c["num_layers"],
}
#: fused BFL modules per preset, per (double, single) block (sd-scripts' own FLUX LoRA: 19 x 10 + 38 x 3 = 304, its
#: "all blocks" count; HunyuanImage 2.1's: 20 x 10 + 40 x 3 = 320)
BFL_STEMS = {"attention": (4, 1), "attention_mlp": (8, 1), "all_linear": (8, 2), "all_linear_mod": (10, 3)}
CASES = [(name, preset) for name in ("sd15", "sdxl", "sd35-medium", "flux1-dev", "qwen-image", "z-image-turbo",
                                      "flux2-klein-4b", "chroma1-hd", "lumina-image-2", "sana-1600m-1024px",
                                      "wan2.1-1.3b", "hunyuanimage-2.1")
          for (family, preset) in TARGETS
          if family == FAMILY[name]]
CASES += [("sd35-large", "attention"), ("flux2-klein-9b", "all_linear"), ("flux2-dev", "all_linear"),
          ("wan2.1-14b", "attention_ffn"), ("wan2.2-a14b", "attention"), ("wan2.2-5b", "attention_ffn")]  # the other sizes


@pytest.mark.parametrize("name,preset", CASES)
def test_lora_targets_and_kohya_keys_per_preset(name, preset):
    """Each preset adapts the modules it says, at real depth; each becomes one kohya / LyCORIS key stem that
    ComfyUI's names map back to it (3 tensors: down, up, alpha), and FLUX's fused BFL form has sd-scripts'
    module count. Wan 2.2 A14B: each expert gets the same adapter, written as its own file of the same keys."""
    from finetune.export.layouts import bound_names
    from finetune.recipe import validate

    comps = fresh(name)
    recipe = validate({"model": {"base": hub_id(name)}, "data": {"sources": [{"type": "folder", "path": "."}]},
                       "method": {"name": "lora", "rank": 4, "targets": preset}}, Path("r.yaml"), set())
    recipe.method.build().setup(comps, 1e-4)
    adapted = [n for n, m in comps.denoiser.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == TARGETS[(comps.family.name, preset)](dict(comps.denoiser.config)), (name, preset)
    for expert in comps.experts.values():  # model.experts: all (the default) trains every expert alike
        assert [n for n, m in expert.named_modules() if hasattr(m, "lora_A")] == adapted
    component = comps.family.denoiser_name
    names = bound_names(comps.family.kohya_names, comps.named_modules())[component]
    if comps.family.name == "lumina2":  # its grouped k / v have no place in ComfyUI's map (refused, one line)
        adapted = [p for p in adapted if not p.endswith(("attn.to_k", "attn.to_v"))]
    stems = {names.key(path): path for path in adapted}
    assert len(stems) == len(adapted)  # 3 * len(adapted) tensors in the file
    assert all(names.canonical(names.path_of(stem)) == names.canonical(path) for stem, path in stems.items())
    if "bfl" in comps.family.lora_layouts:  # FLUX.1, and HunyuanImage 2.1's ComfyUI form
        from finetune.models.families.flux_bfl import geometry_of_model, owner

        c = dict(comps.denoiser.config)
        owners = owner(geometry_of_model(c))
        per_double, per_single = BFL_STEMS[preset]
        stems = per_double * c["num_layers"] + per_single * c["num_single_layers"]
        assert len({owners[p][0] for p in adapted}) == stems, (name, preset)


@pytest.mark.parametrize("name,precision", [(name, "bf16") for name in FAMILY]
                         + [("sd35-medium", "fp16"), ("flux1-dev", "fp16"), ("chroma1-hd", "fp16"),
                            ("wan2.1-1.3b", "fp16")])  # with (U)T5-XXL
def test_estimate_weight_bytes(monkeypatch, name, precision):
    """`finetune estimate`'s weight lines: the denoiser's 16-bit bytes are the published checkpoint's where
    its size is published (FLUX.1 [dev]: 23,802,816,640 bytes), the text encoders count T5's `wo` at 4 bytes
    in fp16 (what the trainer keeps), what diffusers keeps in fp32 at 4 bytes, buffers at their own size; Wan
    2.2 A14B counts both experts. The activation traces are left out here."""
    from finetune.memory import estimate as est_module
    from finetune.recipe import validate

    monkeypatch.setattr(est_module._Sizer, "activations", lambda self, recipe: 0)
    monkeypatch.setattr(est_module._Sizer, "encode", lambda self, recipe, batch: 0)
    recipe = validate({"model": {"base": hub_id(name)}, "data": {"sources": [{"type": "folder", "path": "."}],
                                                                 "cache_text": False},
                       "method": {"name": "lora", "rank": 4}, "train": {"mixed_precision": precision}},
                      Path("r.yaml"), set())
    est = est_module.estimate(recipe, options=False)
    comps = shared(name)

    def nbytes(module, wide=(), parts=()):
        params = sum(p.numel() * (4 if (wide and n.endswith(wide)) or set(parts) & set(n.split(".")) else 2)
                     for n, p in module.named_parameters())
        return params + sum(b.numel() * b.element_size() for b in module.buffers())

    # diffusers keeps these denoiser modules in fp32 at any dtype (Wan: time embedder, modulation, norms)
    parts = getattr(comps.denoiser, "_keep_in_fp32_modules", None) or ()

    denoiser = PUBLISHED.get(name, {}).get(comps.family.denoiser_name)
    expected = nbytes(comps.denoiser, parts=parts)
    if denoiser is not None:  # the published count in place of the config's
        expected += 2 * (denoiser - sum(p.numel() for p in comps.denoiser.parameters()))
    expected *= len(comps.experts)  # Wan 2.2 A14B: both 14B experts are resident
    assert est.bytes_of("denoiser weights") == expected
    wide = ("DenseReluDense.wo.weight",) if precision == "fp16" else ()
    assert est.bytes_of("text encoders") == sum(nbytes(e, wide) for e in comps.text_encoders)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35-medium", "flux1-dev", "qwen-image", "z-image-turbo",
                                  "flux2-klein-4b", "chroma1-hd", "flux2-dev", "lumina-image-2", "sana-1600m-1024px"])
def test_estimate_traces_every_family_at_real_shapes(name):
    """The whole estimate, activation traces included, at 512 px for one base per family: the language-model
    encoders, Z-Image's variable-length captions and the FLUX.2 / Qwen-Image latent layouts all trace on the
    meta device (they used to fail: a mask read on meta, a boolean selection, the VAE's own latent shape)."""
    from finetune.memory.estimate import estimate
    from finetune.recipe import validate

    recipe = validate({"model": {"base": hub_id(name)}, "data": {"sources": [{"type": "folder", "path": "."}],
                                                                 "resolution": 512, "cache_latents": False},
                       "method": {"name": "lora", "rank": 4},
                       "train": {"mixed_precision": "bf16", "gradient_checkpointing": True}}, Path("r.yaml"), set())
    est = estimate(recipe, options=False)
    activations = est.bytes_of("activations")
    assert activations > 0 and est.training > est.bytes_of("denoiser weights") + activations - 1
