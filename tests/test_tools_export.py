"""The deployment tools on the tiny base: fuse, merge, combine, resize, convert, inspect, generate, and
clear one-line errors (exit 2, nothing written) for bad input."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from finetune.export.adapters import fuse, read_adapter
from finetune.export.lora import export_lora
from tests.helpers import adapted, count_adapted, fresh_pipe, load_comps, make_ctx
from tests.helpers import fixed_unet_output as unet_out

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool(name: str):
    """Import tools/<name>.py under a private module name (a private name keeps tools/ apart from imported modules)."""
    if str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))
    spec = importlib.util.spec_from_file_location(f"finetune_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *argv) -> int:
    module = tool(name)  # imports _common too
    return sys.modules["_common"].run(module.main, [str(a) for a in argv])


def out_of(comps) -> torch.Tensor:
    return unet_out(comps.unet, comps.text_encoder, comps.tokenizer)


@pytest.fixture(scope="module")
def two_loras(tiny_base, tmp_path_factory):
    """Two LoRAs of different ranks (kohya files) and the output of applying both through peft."""
    root = tmp_path_factory.mktemp("two")
    a_comps, a_method = adapted(tiny_base, rank=4, alpha=2.0, seed=1, targets=["to_q", "to_v", "proj_in", "conv1"])
    export_lora(a_comps, a_method, root / "a", make_ctx("a"))
    b_comps, b_method = adapted(tiny_base, rank=2, alpha=2.0, seed=7, targets=["to_q", "to_k", "ff.net.2"], te=False)
    export_lora(b_comps, b_method, root / "b", make_ctx("b"))
    return root / "a" / "a.safetensors", root / "b" / "b.safetensors", out_of(a_comps)


@pytest.mark.parametrize("adapter,dora", [("lora", False), ("lora", True), ("loha", False), ("lokr", False)])
def test_fusing_equals_base_plus_adapter(tiny_base, tmp_path, adapter, dora):
    comps, method = adapted(tiny_base, adapter=adapter, dora=dora, rank=4, alpha=3.0)
    export_lora(comps, method, tmp_path, make_ctx(formats=("diffusers",) if dora else ("diffusers", "kohya")))
    ref = out_of(comps)
    base = load_comps(tiny_base)
    # DoRA has no kohya file (finetune/kinds/lora.py): its diffusers file is what gets fused for the UIs
    n = fuse(read_adapter(tmp_path if dora else tmp_path / "tiny.safetensors"), base.named_modules())
    assert n == count_adapted(comps.unet) + count_adapted(comps.text_encoder)
    assert (out_of(base) - ref).abs().max() < 1e-4


def test_merge_fuse_writes_folder_and_single_file_that_agree(tiny_base, tmp_path, two_loras):
    from diffusers import StableDiffusionPipeline

    a, _, ref = two_loras
    folder, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    assert run_tool("merge", "fuse", "--base", tiny_base, "--lora", f"{a}:1.0", "--out", folder,
                    "--single-file", single) == 0
    from_folder = fresh_pipe(folder)
    got = unet_out(from_folder.unet, from_folder.text_encoder, from_folder.tokenizer)
    assert (got - ref).abs().max() < 1e-4
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), safety_checker=None,
                                                    requires_safety_checker=False)
    assert (unet_out(pipe.unet, pipe.text_encoder, pipe.tokenizer) - got).abs().max() < 1e-6
    from finetune.export.io import read_metadata

    assert "finetune.merged_from" in read_metadata(single)


def test_combine_concat_equals_both_applied(tiny_base, tmp_path, two_loras):
    a, b, _ = two_loras
    both = load_comps(tiny_base)
    fuse(read_adapter(a), both.named_modules(), 0.7)
    fuse(read_adapter(b), both.named_modules(), 0.5)
    assert run_tool("merge", "combine", "--lora", f"{a}:0.7", "--lora", f"{b}:0.5", "--out",
                    tmp_path / "ab.safetensors") == 0
    merged = read_adapter(tmp_path / "ab.safetensors")
    key = next(k for k in merged.layers if k.endswith("attn1.to_q"))
    assert merged.layers[key].rank == 6  # 4 + 2
    one = load_comps(tiny_base)
    fuse(merged, one.named_modules())
    assert (out_of(one) - out_of(both)).abs().max() < 1e-4


def test_resize_full_rank_is_exact_and_lower_rank_reports_error(tiny_base, tmp_path, two_loras, capsys):
    a, _, ref = two_loras
    assert run_tool("resize", a, "--rank", 4, "--out", tmp_path / "r4.safetensors") == 0
    assert "worst relative error" in capsys.readouterr().out
    comps = load_comps(tiny_base)
    fuse(read_adapter(tmp_path / "r4.safetensors"), comps.named_modules())
    assert (out_of(comps) - ref).abs().max() < 1e-4
    from finetune.export.lowrank import resize

    small, reports = resize(read_adapter(a), rank=1)
    assert all(r.rank_out == 1 for r in reports) and max(r.rel_error for r in reports) > 0.1
    assert all(abs(r.energy + r.rel_error**2 - 1) < 1e-6 for r in reports)
    _, by_energy = resize(read_adapter(a), energy=0.9)
    assert all(r.energy >= 0.9 - 1e-9 for r in by_energy)


def test_convert_round_trip_is_bit_for_bit(tmp_path, two_loras):
    from safetensors.torch import load_file

    a, _, _ = two_loras
    assert run_tool("convert", "lora", a, "--to", "diffusers", "--out", tmp_path / "d") == 0
    assert run_tool("convert", "lora", tmp_path / "d", "--to", "kohya", "--out", tmp_path / "k.safetensors") == 0
    first, again = load_file(a), load_file(tmp_path / "k.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_inspect_says_what_a_file_is(two_loras, capsys):
    a, _, _ = two_loras
    assert run_tool("inspect_file", a) == 0
    out = capsys.readouterr().out
    assert "kohya lora" in out and "sks" in out and "ranks" in out and "sd1" in out


def _truncated(tmp_path, src: Path) -> Path:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return bad


def test_bad_inputs_give_one_line_and_write_nothing(tiny_base, tmp_path, two_loras, capsys):
    a, _, _ = two_loras
    out = tmp_path / "out.safetensors"
    cases = [
        (("resize", _truncated(tmp_path, a), "--rank", 2, "--out", out), "truncated"),
        (("resize", a, "--rank", 999, "--out", out), "larger than layer"),
        (("convert", "lora", tmp_path / "x.ckpt", "--to", "kohya", "--out", out), "no such file"),
    ]
    torch.save({"w": torch.zeros(2)}, tmp_path / "x.ckpt")
    cases[2] = (cases[2][0], "pickle")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"model.layers.0.weight": torch.zeros(2)}, foreign)
    cases.append((("convert", "lora", foreign, "--to", "kohya", "--out", out), "unknown key layout"))
    wide = tmp_path / "wide.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.ones(2, 7, 1, 1),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2, 1, 1)}, wide)
    cases.append((("merge", "fuse", "--base", tiny_base, "--lora", wide, "--single-file", out), "does not fit"))
    for argv, words in cases:
        assert run_tool(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and "Traceback" not in err, err
        assert not out.exists()


def _images(folder: Path) -> dict[str, torch.Tensor]:
    import numpy as np
    from PIL import Image

    return {p.name: torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)) for p in sorted(folder.glob("*.png"))}


def test_generate_applies_the_lora_and_the_embedding(tiny_base, tmp_path, two_loras):
    from finetune.export.embeddings import save_embeddings

    a, _, _ = two_loras
    save_embeddings({"text_encoder": torch.randn(2, 32, generator=torch.Generator().manual_seed(5))}, ["<sks>"],
                    tmp_path / "emb", make_ctx("sks"), formats=("a1111",))
    common = ["a <sks> circle", "--base", tiny_base, "--seeds", 0, 1, "--steps", 2, "--negative", "blurry"]
    runs = {"both": ["--lora", f"{a}:0.8", "--embedding", tmp_path / "emb" / "sks.safetensors"],
            "embedding": ["--embedding", tmp_path / "emb" / "sks.safetensors"], "base": []}
    got = {}
    for name, extra in runs.items():
        assert run_tool("generate", *common, *extra, "--out", tmp_path / f"{name}.png",
                        "--save-images", tmp_path / name) == 0
        got[name] = _images(tmp_path / name)
        assert list(got[name]) == ["p00-s0.png", "p00-s1.png"]
    for k in got["base"]:  # the LoRA (at 0.8) and the new word each change every image
        assert (got["both"][k] - got["embedding"][k]).abs().mean() > 1, k
        assert (got["embedding"][k] - got["base"][k]).abs().mean() > 1, k
    assert (got["base"]["p00-s0.png"] - got["base"]["p00-s1.png"]).abs().mean() > 1  # seeds differ


def test_weighted_prompt_scales_the_words_embedding(tiny_base):
    """(red:w): the prompt embedding at the word's position moves linearly with w (compel: empty + w x
    (word - empty)); every other position keeps the plain prompt's embedding."""
    from finetune.models.families import FAMILIES

    gen = tool("generate")
    pipe, _, _ = gen.build_pipeline(gen.parse_args(["x", "--base", str(tiny_base), "--device", "cpu"]))
    ids = pipe.tokenizer("a red square", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        plain = pipe.text_encoder(ids)[0][0]
        weighted = {w: gen.encode(pipe, FAMILIES["sd1"], f"a (red:{w}) square", "")["prompt_embeds"][0]
                    for w in (1.3, 1.6)}
    red = 2  # <start> a red square
    for w, emb in weighted.items():
        others = torch.cat([emb[:red], emb[red + 1:]]) - torch.cat([plain[:red], plain[red + 1:]])
        assert float(others.abs().max()) < 1e-5, w
        assert float((emb[red] - plain[red]).abs().max()) > 1e-3, w
    assert torch.allclose(weighted[1.6][red] - plain[red], 2 * (weighted[1.3][red] - plain[red]), atol=1e-5)


def test_img2img_output_follows_the_init_image(tiny_base, tmp_path):
    from PIL import Image

    outs = {}
    for colour in ("red", "blue"):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{colour}.png")
        assert run_tool("generate", "a circle", "--base", tiny_base, "--init-image", tmp_path / f"{colour}.png",
                        "--strength", 0.5, "--steps", 2, "--seeds", 0, "--out", tmp_path / f"{colour}-grid.png",
                        "--save-images", tmp_path / colour) == 0
        outs[colour] = _images(tmp_path / colour)["p00-s0.png"]
    assert outs["red"].shape == (64, 64, 3)
    assert (outs["red"] - outs["blue"]).abs().mean() > 5  # same seed and prompt: only the init image differs
