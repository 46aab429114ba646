"""Lumina 2 on a tiny model built offline: the text conditioning (system prompt, Gemma's second-to-last state,
right-padded mask) and the reversed-time flow loss against Lumina2Pipeline's own pieces, the latents against the
pipeline's normalisation, detection against Z-Image (its Next-DiT descendant). Training, every adapter kind,
exports, DDP and resume: tests/test_qwen_families.py (table-driven, Lumina 2 is one of its cases)."""

from __future__ import annotations

import pytest
import torch

from tests.qwen_families import CAPTIONS, CASES, build, first_step_noise_and_sigmas, recipe, trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build("lumina2", tmp_path_factory.mktemp("tiny") / "lumina2")


def test_text_and_mask_are_the_pipelines(base):
    from diffusers import Lumina2Pipeline

    from finetune.models.base import resolve_base
    from finetune.models.components import LoadOptions, load_components

    comps = load_components(resolve_base(str(base)), LoadOptions(max_sequence_length=48))
    pipe = Lumina2Pipeline.from_pretrained(base)
    with torch.no_grad():
        ours = comps.family.encode_prompt(comps, CAPTIONS, "cpu")
        embeds, mask, *_ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, device="cpu",
                                              max_sequence_length=48)
    assert ours["prompt_embeds"].shape == embeds.shape == (3, 48, 16)
    assert float((ours["prompt_embeds"] - embeds).abs().max()) < 1e-6
    assert torch.equal(ours["prompt_attention_mask"], mask)
    assert mask.sum(1).tolist() == [35, 27, 27]  # <bos>, system prompt, marker (its last space joins a word)
    assert mask[:, 0].all() and not mask[:, -1].any()  # right padding: the transformer counts the caption first


def test_latents_are_what_the_pipeline_decodes(base):
    """Lumina2Pipeline decodes `latents / scaling_factor + shift_factor` (and diffusers' Lumina 2 script encodes
    `(z - shift_factor) * scaling_factor`): our latents un-normalised so are the VAE's mode."""
    from diffusers import Lumina2Pipeline

    from finetune.models.families import FAMILIES

    vae = Lumina2Pipeline.from_pretrained(base).vae
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours = FAMILIES["lumina2"].encode_latents(vae, pixels)
        mode = vae.encode(pixels).latent_dist.mode()
    assert ours.shape == (2, 16, 8, 8)
    assert float((ours / vae.config.scaling_factor + vae.config.shift_factor - mode).abs().max()) < 1e-6
    assert float((ours - mode).abs().max()) > 1e-2  # the normalisation is not the identity


@pytest.mark.parametrize("flow", [{}, {"timestep_sampling": "uniform", "resolution_shift": False}])
def test_flow_loss_equals_the_pipelines_own_computation(tmp_path, base, flow):
    """A batch's loss written out as Lumina2Pipeline's loop drives the transformer: `encode_prompt` (embeddings
    and mask), the timestep 1 - sigma, the output negated into the flow target's sign. Sigmas: logit-normal on the
    unshifted grid moved by `calculate_shift` for the token count (default), or uniform on the scheduler's own
    grid (its static shift 6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    t = trainer(recipe(tmp_path, base, CASES["lumina2"], train={"flow": flow}, data={"cache_text": False}))
    pipe = Lumina2Pipeline.from_pretrained(base)
    batch = next(iter(t.data.loader(0)))
    with torch.no_grad():
        loss, _ = t.compute_loss(batch)
        latents = t.encode_latents(batch["pixel_values"])
        embeds, mask, *_ = pipe.encode_prompt(list(batch["captions"]), do_classifier_free_guidance=False,
                                              device="cpu", max_sequence_length=48)
        b, c, h, w = latents.shape
        grid = {} if flow else {"shift": 1.0}  # the resolution shift replaces the static one
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **grid)
        noise, sigmas = first_step_noise_and_sigmas(t, latents, sched, flow, (h // 2) * (w // 2))
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        out = pipe.transformer(hidden_states=noisy, timestep=1 - sigmas * 1000 / 1000, encoder_hidden_states=embeds,
                               encoder_attention_mask=mask, return_dict=False)[0]
        ref = ((-out - (noise - latents)) ** 2).reshape(b, -1).mean(1).mean()
    assert abs(float(loss) - float(ref)) < 1e-6, (float(loss), float(ref))


def test_lumina2_and_z_image_never_mistaken():
    """Z-Image grew out of Lumina 2's Next-DiT (ComfyUI loads both as one model class); diffusers folders tell them
    apart by the denoiser class, whichever text encoder sits beside it."""
    from finetune.models.detect import family_from_configs

    lumina = {"transformer": ["diffusers", "Lumina2Transformer2DModel"], "text_encoder": ["transformers", "Gemma2Model"]}
    z_image = {"transformer": ["diffusers", "ZImageTransformer2DModel"], "text_encoder": ["transformers", "Qwen3Model"]}
    assert family_from_configs(lumina, {"cap_feat_dim": 2304}, {"model_type": "gemma2"}).name == "lumina2"
    assert family_from_configs(z_image, {"cap_feat_dim": 2560}, {"model_type": "qwen3"}).name == "z_image"
    assert family_from_configs(lumina, {}, {"model_type": "qwen3"}).name == "lumina2"


def test_validation_passes_the_mask_and_samples_with_cfg(tmp_path, base):
    """Validation's pipeline gets the cached text with its integer mask (the transformer counts caption tokens
    from it) and the pipeline's real CFG at 4.0; the sampler is the base's (static shift 6)."""
    t = trainer(recipe(tmp_path, base, CASES["lumina2"]))
    family = t.comps.family
    text = family.encode_prompt(t.comps, ["a red circle"], "cpu")
    kwargs = family.pipeline_prompt_kwargs(text, text)
    assert kwargs["prompt_attention_mask"].dtype == kwargs["negative_prompt_attention_mask"].dtype == torch.long
    pipe = t.comps.pipeline()
    assert family.guidance_kwargs(pipe, None) == {"guidance_scale": 4.0}
    assert pipe.scheduler.config.shift == 6.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_comfy_form_refuses_grouped_keys_and_values_in_one_line(base):
    """ComfyUI's Lumina 2 map slices q, k and v at the full width; the tiny model's keys and values are half of it
    (1 of 2 heads, as the real 8 of 24): their adapters are refused in that form, q and the rest are spelled as
    ComfyUI reads them; a model without grouping keeps k and v."""
    from diffusers import Lumina2Transformer2DModel

    from finetune.errors import ModelError
    from finetune.models.families import FAMILIES

    names = FAMILIES["lumina2"].kohya_names["transformer"]
    grouped = names.bind(Lumina2Transformer2DModel.from_pretrained(base / "transformer"))
    assert grouped.key("layers.1.attn.to_q") == "lycoris_layers_1_attention_to_q"
    assert grouped.key("context_refiner.0.feed_forward.linear_3") == "lycoris_context_refiner_0_feed_forward_w3"
    assert grouped.path_of("lycoris_noise_refiner_0_attention_to_out_0") == "noise_refiner.0.attn.to_out.0"
    with pytest.raises(ModelError, match="grouped-query attention") as e:
        grouped.key("layers.0.attn.to_k")
    assert "\n" not in str(e.value)
    full = names.bind(Lumina2Transformer2DModel(hidden_size=32, num_layers=1, num_refiner_layers=1, num_attention_heads=2,
                                                num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6), cap_feat_dim=16))
    assert full.key("layers.0.attn.to_v") == "lycoris_layers_0_attention_to_v"


def test_comfy_form_with_keys_or_values_is_refused_before_loading(tmp_path, base):
    """The same limit at recipe time: asking for the ComfyUI form of adapters on to_k / to_v stops `--check` with
    one line naming export.formats, before any weight loads; without them the recipe passes."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    def check(**method):
        path = recipe(tmp_path, base, CASES["lumina2"], method=method, export={"formats": ["diffusers", "kohya"]})
        return subprocess.run([sys.executable, "-m", "finetune", str(path), "--check"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    out = check()
    assert out.returncode == 2 and "export.formats: 'kohya'" in out.stderr and "Traceback" not in out.stderr
    assert check(targets=["attn.to_q", "attn.to_out.0"]).returncode == 0


@pytest.fixture(scope="module")
def nextdit_run(tmp_path_factory, base):
    """A LoRA on every linear the presets reach (q/k/v/out and the MLPs), written in diffusers and Next-DiT form."""
    tmp = tmp_path_factory.mktemp("nextdit")
    t = trainer(recipe(tmp, base, CASES["lumina2"], export={"formats": ["diffusers", "nextdit"], "name": "subject"}))
    t.run()
    return t, tmp / "out"


def native_weights(model) -> dict[str, tuple[int, int]]:
    """The Next-DiT (ComfyUI / original) linear weights of a diffusers Lumina 2 model and their shapes: q, k and v
    stacked into attention.qkv (diffusers' convert_lumina2_to_diffusers splits them back), the rest renamed."""
    from finetune.models.families.lumina2_nextdit import RENAMES

    shapes = {}
    for name, m in model.named_modules():
        name = name.replace(".base_layer", "")  # an adapted linear (peft keeps the weight there)
        if not isinstance(m, torch.nn.Linear) or "lora_" in name \
                or not name.startswith(("layers.", "noise_refiner.", "context_refiner.")):
            continue
        block, tail = ".".join(name.split(".")[:2]), ".".join(name.split(".")[2:])
        if tail in ("attn.to_q", "attn.to_k", "attn.to_v"):
            rows, cols = shapes.get(f"{block}.attention.qkv", (0, m.in_features))
            shapes[f"{block}.attention.qkv"] = (rows + m.out_features, cols)
        elif tail in RENAMES:
            shapes[f"{block}.{RENAMES[tail]}"] = (m.out_features, m.in_features)
    return shapes


def test_nextdit_keys_are_comfys_own_weights_and_each_part_is_exact(nextdit_run):
    """Every key is 'lora_unet_' + a Next-DiT weight ComfyUI's Lumina2 model has (comfy/lora.py maps that for any
    weight), its delta has that weight's shape, and each of q / k / v (grouped: k and v half of q here) gets exactly
    its own diffusers delta at its rows, at the trained strength (alpha 2 / rank 4)."""
    from safetensors.torch import load_file

    from finetune.models.families.lumina2_nextdit import PREFIX, RENAMES

    back = {v: k for k, v in RENAMES.items()}
    t, out = nextdit_run
    model = t.comps.denoiser
    native = {f"{PREFIX}_{n}".replace(".", "_"): (n, s) for n, s in native_weights(model).items()}
    fused, diffusers = load_file(out / "subject_nextdit.safetensors"), load_file(out / "pytorch_lora_weights.safetensors")
    stems = {k.split(".")[0] for k in fused}
    assert len(stems) == 4 * 5  # 4 blocks (2 joint, 1 noise, 1 context refiner): qkv, out, w1, w2, w3
    d = model.config.hidden_size
    for stem in stems:
        name, shape = native[stem]  # KeyError: a weight ComfyUI's model does not have
        up, down, alpha = (fused[f"{stem}.{s}"] for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        delta = up @ down * float(alpha) / down.shape[0]
        assert tuple(delta.shape) == shape
        block = ".".join(name.split(".")[:2])
        parts = {"attn.to_q": (0, d), "attn.to_k": (d, d // 2), "attn.to_v": (d + d // 2, d // 2)} \
            if name.endswith("qkv") else {name.split(".", 2)[2]: (0, shape[0])}
        for tail, (lo, rows) in parts.items():
            module = tail if name.endswith("qkv") else back[tail]
            b = diffusers[f"transformer.{block}.{module}.lora_B.weight"]
            a = diffusers[f"transformer.{block}.{module}.lora_A.weight"]
            assert torch.allclose(delta[lo: lo + rows], b @ a * 0.5, atol=1e-7), (stem, tail)


def test_nextdit_converts_both_ways_exactly_and_reloads(tmp_path, nextdit_run, base):
    from diffusers import Lumina2Pipeline
    from safetensors.torch import load_file

    from finetune.export.convert import convert_lora
    from tests.qwen_families import fixed_output

    t, out = nextdit_run
    back = load_file(convert_lora(out / "subject_nextdit.safetensors", tmp_path / "d", "diffusers"))
    original = load_file(out / "pytorch_lora_weights.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    again = load_file(convert_lora(out / "pytorch_lora_weights.safetensors", tmp_path / "n.safetensors", "nextdit"))
    fused = load_file(out / "subject_nextdit.safetensors")
    assert again.keys() == fused.keys() and all(torch.equal(again[k], fused[k]) for k in fused)
    pipe = Lumina2Pipeline.from_pretrained(base)
    pipe.load_lora_weights(tmp_path / "d")
    case = CASES["lumina2"]
    assert float((fixed_output(case, pipe.transformer) - fixed_output(case, t.comps.denoiser)).abs().max()) < 1e-4


def test_nextdit_holds_plain_lora_only(tmp_path, base):
    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match="nextdit"):
        trainer(recipe(tmp_path, base, CASES["lumina2"], method={"adapter": "loha"},
                       export={"formats": ["diffusers", "nextdit"]}))
