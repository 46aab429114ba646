"""The committed FLUX-shaped toy base: a stock FluxPipeline folder that loads offline, renders, and
follows prompts; and the build code that makes it (objective conventions, resumable training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from finetune.toy import build_flux, score, toy_base_path, toy_flux_base_path, world

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REQUIRED_FILES = {
    "model_index.json",
    "toy_build.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/tokenizer.json",
    "scheduler/scheduler_config.json",
}


@pytest.fixture(scope="module")
def pipe():
    import torch
    from diffusers import FluxPipeline

    if not (toy_flux_base_path() / "model_index.json").exists():
        pytest.fail(f"no committed FLUX toy base at {toy_flux_base_path()}; build it: make_toy_model.py --flux")
    return FluxPipeline.from_pretrained(toy_flux_base_path(), torch_dtype=torch.float32)


def _files() -> set[str]:
    root = toy_flux_base_path()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- the folder
def test_flux_base_is_a_standard_flux_folder_under_15_mb(pipe):
    files = _files()
    assert REQUIRED_FILES <= files, REQUIRED_FILES - files
    assert not any(f.endswith((".bin", ".ckpt", ".pt", ".pth")) for f in files), "safetensors only"
    assert sum((toy_flux_base_path() / f).stat().st_size for f in files) < 15e6
    names = {k: type(getattr(pipe, k)).__name__ for k in ("transformer", "text_encoder", "text_encoder_2")}
    assert names == {
        "transformer": "FluxTransformer2DModel",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    }
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    index = json.loads((toy_flux_base_path() / "model_index.json").read_text())
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"], "the name FLUX repos use"
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.base_image_seq_len == 64


def test_flux_base_has_the_architecture_written_in_build_flux(pipe):
    cfg = pipe.transformer.config
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in build_flux.TRANSFORMER_CONFIG}
    assert got == build_flux.TRANSFORMER_CONFIG
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim, "rotary axes must fill the head dim"
    assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1, "double and single blocks"
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    # random_flux_pipeline builds exactly the committed shapes (tests of the FLUX family rely on it)
    rand = build_flux.random_flux_pipeline()
    for part in ("transformer", "text_encoder_2", "vae"):
        want = {k: tuple(v.shape) for k, v in getattr(pipe, part).state_dict().items()}
        assert {k: tuple(v.shape) for k, v in getattr(rand, part).state_dict().items()} == want, part


def test_flux_base_reuses_the_sd_toy_clip():
    import torch
    from transformers import CLIPTextModel

    ours = CLIPTextModel.from_pretrained(toy_flux_base_path() / "text_encoder").state_dict()
    sd = CLIPTextModel.from_pretrained(toy_base_path() / "text_encoder").state_dict()
    assert ours.keys() == sd.keys() and all(torch.equal(ours[k], sd[k]) for k in sd)


def test_t5_tokenizer_knows_the_toy_words_and_splits_rare_ones(pipe):
    tok = pipe.tokenizer_2
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == build_flux.MAX_SEQUENCE_LENGTH
    ids = tok("a red circle on a white background").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "▁on", "▁a", "▁white", "▁background", "</s>"]
    rare = tok.convert_ids_to_tokens(tok("a sks heart").input_ids)
    assert rare == ["▁a", "▁", "s", "k", "s", "▁heart", "</s>"], "a trigger word is characters, not <unk>"
    assert tok.unk_token_id not in tok("A Photo of my 2 dogs!").input_ids
    assert tok.get_vocab() == build_flux.make_t5_tokenizer().get_vocab()  # committed = what the code builds


def test_vae_raw_latents_need_flux_shift_and_scale(pipe):
    import torch

    from finetune.toy.build import to_tensor

    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    assert (shift, scale) == (build_flux.VAE_SHIFT_FACTOR, build_flux.VAE_SCALING_FACTOR)
    x = to_tensor(world.to_array(world.vae_images(64, seed=99)))
    with torch.no_grad():
        raw = pipe.vae.encode(x).latent_dist.mean
        rec = pipe.vae.decode(raw).sample
    assert abs(raw.mean().item() - shift) < 0.25 and 0.7 < raw.std().item() * scale < 1.3
    z = (raw - shift) * scale  # what a FLUX trainer feeds the transformer
    assert abs(z.mean().item()) < 0.25 and 0.7 < z.std().item() < 1.3
    assert abs(raw.mean().item()) > 0.5, "an unshifted latent would hide a missing shift"
    psnr = 10 * np.log10(4.0 / torch.mean((rec - x) ** 2).item())
    assert psnr > 22.0, psnr


def test_flux_base_renders_prompts_in_a_stock_pipeline(pipe):
    import torch

    prompts, seeds = ["a red circle", "a blue square"], (0, 1, 2, 3)
    out = pipe(
        [p for p in prompts for _ in seeds],
        negative_prompt=[""] * 8,
        true_cfg_scale=build_flux.SAMPLER["guidance"],
        num_inference_steps=12,
        max_sequence_length=build_flux.MAX_SEQUENCE_LENGTH,
        generator=[torch.Generator().manual_seed(s) for _ in prompts for s in seeds],
        height=64,
        width=64,
    )
    assert [im.size for im in out.images] == [(64, 64)] * 8
    assert world.to_array(out.images).std() > 10, "a blank image means the transformer produced nothing"
    colours = [score.colour_of(im) for im in out.images]
    # the base gets colours right 92% of the time (docs/toy.md): at least 3 of 4 seeds per prompt
    assert colours[:4].count("red") >= 3 and colours[4:].count("blue") >= 3, colours


# ---------------------------------------------------------------------------------------------- build code
def test_objective_velocity_is_what_the_pipeline_sampler_integrates():
    """A perfect prediction of the training target, stepped by FluxPipeline's scheduler, lands on x0."""
    import torch
    from diffusers import FluxPipeline

    from finetune.toy.build_flux_train import FlowObjective

    class Oracle(torch.nn.Module):
        def forward(self, hidden_states, timestep, **kw):
            self.seen = (hidden_states, timestep)
            return type("Out", (), {"sample": packed_target})()

    sched = build_flux.make_scheduler()
    cfg = type("Cfg", (), {"shift_factor": 1.0, "scaling_factor": 0.5})()
    obj = FlowObjective(cfg, sched, latent_hw=16)
    gen = torch.Generator().manual_seed(0)
    raw = 1.0 + 2.0 * torch.randn(3, 4, 16, 16, generator=gen)
    x0 = (raw - 1.0) * 0.5
    g2 = torch.Generator().manual_seed(1)
    noise, sigma = torch.randn(x0.shape, generator=g2), obj.sigmas(3, g2)
    packed_target = FluxPipeline._pack_latents(noise - x0, 3, 4, 16, 16)
    oracle = Oracle()
    loss = obj.loss(oracle, raw, torch.zeros(3, 32, 64), torch.zeros(3, 64), torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    xs, s = oracle.seen
    assert torch.equal(s, sigma), "the transformer gets sigma itself (FluxPipeline's timestep / 1000)"
    for i in range(3):  # one Euler step from sigma s to 0 with the pipeline's own scheduler
        sched.set_timesteps(sigmas=[s[i].item()], mu=obj.mu)
        sched.sigmas[0] = s[i]  # undo the shift set_timesteps applies: s is already shifted
        x = sched.step(packed_target[i : i + 1], sched.timesteps[0], xs[i : i + 1]).prev_sample
        assert torch.allclose(FluxPipeline._unpack_latents(x, 64, 64, 4)[0], x0[i], atol=1e-5)
    assert 0.0 < s.min() and s.max() < 1.0


def test_build_writes_a_loadable_base_and_resumes_bit_identically(tmp_path):
    import torch
    from diffusers import FluxPipeline

    from finetune.toy import build_flux_train as bft

    text = build_flux.text_components(0)
    parts = {**text, "vae": build_flux.make_vae()}
    data = bft.prepare_data(parts["vae"], text, 48, seed=0)

    straight = bft.Trainer(4, 0, 1e-3, tmp_path / "a.pt", batch=4)
    bft.train(parts, data, straight, eval_every=0)
    half = bft.Trainer(4, 0, 1e-3, tmp_path / "b.pt", batch=4)
    for _ in range(2):
        half.train_step(bft.FlowObjective(parts["vae"].config, build_flux.make_scheduler(), 16), data, 0.1)
    half.save()
    resumed = bft.Trainer(4, 0, 1e-3, tmp_path / "b.pt", batch=4)
    assert resumed.step == 2
    bft.train(parts, data, resumed, eval_every=0)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not torch.equal(straight.model.state_dict()["proj_out.weight"],
                           build_flux.make_transformer(0).state_dict()["proj_out.weight"]), "it trained"

    size = build_flux.save_flux_pipeline(tmp_path / "base", {**parts, "transformer": straight.ema_model()}, {})
    assert size < 15.0
    loaded = FluxPipeline.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    assert loaded.vae.config.shift_factor == build_flux.VAE_SHIFT_FACTOR


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_flux_base_follows_prompts_and_knows_no_held_out_subject(pipe):
    from finetune.toy import evaluate

    pipe.set_progress_bar_config(disable=True)
    kw = evaluate.sampler_settings(toy_flux_base_path())
    assert kw == {"steps": build_flux.SAMPLER["steps"], "guidance": build_flux.SAMPLER["guidance"]}
    following, images = evaluate.prompt_following(pipe, **kw)  # 20 prompts x 4 seeds
    assert following["colour_acc"] >= 0.90 and following["shape_acc"] >= 0.80, following
    held = evaluate.held_out_before(pipe, unrelated=images, **kw)
    for name, row in held.items():
        # before fine-tuning 'a sks heart' is no closer to the subject than unrelated images are
        assert row["rare_token_prompts"] < 0.1 and row["instance_images"] > 0.8, (name, row)
