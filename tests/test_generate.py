"""tools/generate.py on every family: prompt weighting goes through all of the family's text encoders (SDXL:
both, with the pooled embedding) and changes what conditions the U-Net; image-to-image uses the family's own
pipeline and depends on the init image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_tools_export import run_tool, tool

BASES = {"sd1": "tiny_base", "sd2": "tiny_sd2_base", "sdxl": "tiny_sdxl_base"}


@pytest.fixture(params=sorted(BASES))
def family_base(request):
    return request.param, request.getfixturevalue(BASES[request.param])


def test_weighting_changes_the_embeddings_of_every_encoder(family_base):
    family, base = family_base
    gen = tool("generate")
    pipe, comps, _ = gen.build_pipeline(gen.parse_args(["x", "--base", str(base)]))
    plain = gen.encode(pipe, comps.family, "a (red:1.0) square", "")
    heavy = gen.encode(pipe, comps.family, "a (red:1.8) square", "")
    dash = gen.encode(pipe, comps.family, "a close-up of a red square", "blurry")  # '-' goes through compel too
    width = pipe.unet.config.cross_attention_dim  # SDXL: both encoders' widths, concatenated
    for text in (plain, heavy, dash):
        assert text["prompt_embeds"].shape[-1] == width
        assert text["prompt_embeds"].shape == text["negative_prompt_embeds"].shape
        assert ("pooled_prompt_embeds" in text) == (family == "sdxl")
    assert (heavy["prompt_embeds"] - plain["prompt_embeds"]).abs().max() > 1e-3
    if family == "sdxl":  # no negative prompt: zeros, as the pipeline itself does for SDXL
        assert plain["negative_prompt_embeds"].abs().max() == 0


def test_img2img_depends_on_the_init_image(tmp_path, family_base):
    family, base = family_base
    outputs = []
    for colour in ("red", "blue"):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{colour}.png")
        out = tmp_path / f"{colour}_grid.png"
        assert run_tool("generate", "a (circle:1.2)", "--base", base, "--init-image", tmp_path / f"{colour}.png",
                        "--strength", 0.5, "--steps", 2, "--seeds", 0, "--save-images", tmp_path / colour,
                        "--out", out) == 0
        outputs.append(np.asarray(Image.open(tmp_path / colour / "p00-s0.png"), dtype=np.float32))
    assert outputs[0].shape[:2] == (64, 64)
    # same seed, same prompt: the only difference is the init image (0..255 scale; the tiny VAE is random)
    assert np.abs(outputs[0] - outputs[1]).mean() > 1.0
