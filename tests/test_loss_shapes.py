"""Loss shapes and masks: pseudo-Huber / smooth L1 with sd-scripts' c schedules, debiased estimation weights, and
masked loss that ignores the masked-out region exactly (zero gradient there), from mask files through the data
pipeline (resize, crop, flip, latent cache) to the loss."""

from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

from finetune.sections import LossSection
from finetune.train.loss import debiased_weights, diffusion_loss, element_loss, huber_c, masked_mean


def test_huber_c_schedules_follow_sd_scripts():
    snr = torch.tensor([1e-4, 1.0, 1e4])
    t = torch.tensor([1.0, 0.5, 0.0])
    c = 0.1
    snr_c = huber_c(LossSection(type="huber", huber_c=c, huber_schedule="snr"), snr, t)
    sigma = snr.rsqrt()
    assert torch.allclose(snr_c, (1 - c) / (1 + sigma) ** 2 + c)
    assert snr_c[0] < 0.11 and snr_c[2] > 0.98  # ~c at pure noise, ~1 (MSE-like) when nearly clean
    exp_c = huber_c(LossSection(type="huber", huber_c=c, huber_schedule="exponential"), snr, t)
    assert torch.allclose(exp_c, torch.tensor([0.1, 0.1**0.5, 1.0]))
    const = huber_c(LossSection(type="huber", huber_c=c, huber_schedule="constant"), snr, t)
    assert torch.equal(const, torch.full((3,), c))


def test_huber_is_quadratic_near_zero_and_linear_far_away():
    shape = LossSection(type="huber", huber_c=0.5, huber_schedule="constant")
    snr, t = torch.ones(1), torch.ones(1)
    small = torch.tensor([[1e-3]])
    big = torch.tensor([[100.0]])
    zero = torch.zeros(1, 1)
    assert float(element_loss(small, zero, shape, snr, t)) == pytest.approx(1e-6, rel=1e-3)  # = d^2
    assert float(element_loss(big, zero, shape, snr, t)) == pytest.approx(2 * 0.5 * (100 - 0.5), rel=1e-3)  # ~2c|d|
    smooth = LossSection(type="smooth_l1", huber_c=0.5, huber_schedule="constant")
    assert float(element_loss(big, zero, smooth, snr, t)) == pytest.approx(2 * (100 - 0.5), rel=1e-3)
    assert torch.equal(element_loss(big, zero), big**2)  # no shape: squared error


def test_debiased_weights():
    snr = torch.tensor([0.25, 4.0, 1e6])
    assert torch.allclose(debiased_weights(snr, False), torch.tensor([2.0, 0.5, 1000**-0.5]))
    assert torch.allclose(debiased_weights(snr, True), torch.tensor([1 / 1.25, 1 / 5.0, 1 / 1001.0]))


def test_huber_keys_are_refused_for_mse():
    with pytest.raises(ValueError, match="train.loss.huber_c applies to type huber"):
        LossSection(huber_c=0.2)


def test_masked_out_region_gets_exactly_zero_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :4] = 0.0  # left half masked out
    for shape in (None, LossSection(type="huber", huber_c=0.1)):
        pred.grad = None
        elements = element_loss(pred, target, shape, torch.ones(2), torch.ones(2) * 0.5)
        loss, _ = diffusion_loss(pred, target, None, None, 1.0, elements=elements, mask=mask)
        loss.backward()
        assert float(pred.grad[..., :4].abs().max()) == 0.0
        assert float(pred.grad[..., 4:].abs().min()) > 0.0
        # only the kept half counts: the loss is that half's mean
        assert float(loss.detach()) == pytest.approx(float(elements.detach()[..., 4:].mean()), rel=1e-6)
    half = torch.full((1, 1, 2, 2), 0.25)
    assert float(masked_mean(torch.ones(1, 4, 2, 2), half)) == pytest.approx(1.0)  # weights normalise


def _masked_images(folder, n=4):
    """Images whose right half is red and left half green; masks keep the right half only."""
    (folder / "masks").mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (96, 64), (40, 200, 40))
        im.paste((220, 30, 30), (48, 0, 96, 64))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a sks thing")
        m = Image.new("L", (96, 64), 0)
        m.paste(255, (48, 0, 96, 64))
        m.save(folder / "masks" / f"{i}.png")
    return folder


@pytest.mark.parametrize("cache", [False, True])
def test_masks_follow_crop_and_flip_to_the_latent_grid(tmp_path, tiny_base, cache):
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import write_recipe

    images = _masked_images(tmp_path / "images")
    path = write_recipe(tmp_path, tiny_base, images, data={
        "masks": {"unmasked_weight": 0.0}, "random_flip": True, "cache_latents": cache,
        "buckets": {"enabled": False}}, train={"batch_size": 4})
    r = load_recipe(path)
    t = Trainer(r, make_accelerator(r))
    batch = next(iter(t.data.loader(0)))
    mask = batch["loss_mask"]
    side = t.encode_latents(torch.zeros(1, 3, 64, 64)).shape[-1]  # the tiny VAE: 16
    assert mask.shape == ((4, 1, side, side) if cache else (4, 1, 64, 64))  # cached: stored at the latent grid
    from finetune.data.masks import to_latent

    lat = to_latent(mask, (side, side))
    # a 96x64 image is resized to cover 64x64 (96x64 -> 96 wide) and centre-cropped: columns 16..80 of the
    # original; the red (kept) half starts at column 48, i.e. the middle of the crop
    half = side // 2
    flips = [ex.flip for ex in t.data.plan(0)[0]]
    assert any(flips) and not all(flips)
    for m, flip in zip(lat, flips, strict=True):
        kept, dropped = (m[0, :, :half], m[0, :, half:]) if flip else (m[0, :, half:], m[0, :, :half])
        assert float(kept.min()) == pytest.approx(1.0, abs=0.02) and float(dropped.max()) < 0.02
    # and the pixels are the red half where the mask keeps them
    if not cache:
        px = batch["pixel_values"]
        for p, m in zip(px, mask, strict=True):
            red = p[0][m[0] > 0.99].mean()
            green = p[1][m[0] > 0.99].mean()
            assert red > 0.5 > green


def test_missing_required_mask_is_one_line(tmp_path, tiny_base):
    from finetune.errors import DataError
    from finetune.recipe import load_recipe
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import draw_images, write_recipe

    images = draw_images(tmp_path / "images", n=2)
    path = write_recipe(tmp_path, tiny_base, images, data={"masks": {"required": True}})
    r = load_recipe(path)
    with pytest.raises(DataError) as err:
        t = Trainer(r, make_accelerator(r))
        next(iter(t.data.loader(0)))
    assert "no mask" in str(err.value) and "\n" not in str(err.value)


def test_the_trainer_loss_applies_mask_shape_and_weights(tmp_path, tiny_base):
    from finetune.recipe import load_recipe
    from finetune.train.loss import example_generator
    from finetune.train.preserve import training_loss
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import write_recipe

    images = _masked_images(tmp_path / "images")
    path = write_recipe(tmp_path, tiny_base, images, data={"masks": {}, "cache_latents": True},
                        train={"batch_size": 4, "min_snr_gamma": 5.0})
    r = load_recipe(path)
    t = Trainer(r, make_accelerator(r))
    batch = next(iter(t.data.loader(0)))
    example = t.objective.example(batch["latents"], [example_generator(k) for k in range(4)])
    pred = torch.randn(example.target.shape, generator=torch.Generator().manual_seed(99), requires_grad=True)
    loss, _ = training_loss(t, pred, example.target, example, batch)
    loss.backward()
    half = pred.shape[-1] // 2  # the masks keep the right half (no flips here)
    assert float(pred.grad[..., :half].abs().max()) == 0.0 and float(pred.grad[..., half:].abs().min()) > 0.0
    right = ((pred.detach() - example.target) ** 2)[..., half:].mean(dim=(1, 2, 3))
    assert float(loss.detach()) == pytest.approx(float((right * example.weights).mean()), rel=1e-5)

    t.recipe.train.loss = LossSection(type="smooth_l1", huber_c=0.1, debiased_estimation=True)
    loss2, _ = training_loss(t, pred.detach(), example.target, example, batch)
    c = huber_c(t.recipe.train.loss, example.snr, example.t_frac).view(-1, 1, 1, 1)
    d2 = (pred.detach() - example.target) ** 2
    manual = (2 * (torch.sqrt(d2 + c**2) - c))[..., half:].mean(dim=(1, 2, 3))
    manual = manual * example.weights * debiased_weights(example.snr, False)
    assert float(loss2) == pytest.approx(float(manual.mean()), rel=1e-4)


def test_masked_out_area_trains_toward_the_base(tmp_path, tiny_base):
    """data.masks.unmasked_target: base: inside the mask the image's target, outside the base's own prediction
    (weighted by base_weight), so the adapter is held to the base there instead of being free."""
    from finetune.recipe import load_recipe
    from finetune.train.loss import example_generator, example_keys
    from finetune.train.preserve import base_predictions, base_rows, training_loss
    from finetune.train.setup import make_accelerator
    from finetune.train.trainer import Trainer
    from tests.helpers import randomise, write_recipe

    images = _masked_images(tmp_path / "images")
    path = write_recipe(tmp_path, tiny_base, images, data={
        "masks": {"unmasked_target": "base", "base_weight": 0.5}, "cache_latents": True,
        "buckets": {"enabled": False}}, train={"batch_size": 4, "min_snr_gamma": 5.0})
    r = load_recipe(path)
    t = Trainer(r, make_accelerator(r))
    batch = next(iter(t.data.loader(0)))
    assert batch["masked"].tolist() == [True] * 4 and base_rows(t, batch) == [True] * 4
    example = t.objective.example(batch["latents"], [example_generator(k) for k in range(4)])
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(example.target.shape, generator=gen)
    pred = torch.randn(example.target.shape, generator=gen, requires_grad=True)
    loss, _ = training_loss(t, pred, example.target, example, batch, base)
    loss.backward()
    half = pred.shape[-1] // 2
    p = pred.detach()
    # the subject's mean, plus base_weight times the masked-out area's mean toward the base
    right = ((p - example.target) ** 2)[..., half:].mean(dim=(1, 2, 3))
    left = ((p - base) ** 2)[..., :half].mean(dim=(1, 2, 3))
    assert float(loss.detach()) == pytest.approx(float(((right + 0.5 * left) * example.weights).mean()), rel=1e-5)
    # outside, the gradient pulls toward the base and not toward the image's own target
    g = pred.grad[..., :half]
    n_left = p[0, ..., :half].numel()
    expected = (p - base)[..., :half] * (2 * 0.5 / n_left / 4) * example.weights.view(-1, 1, 1, 1)
    assert torch.allclose(g, expected, rtol=1e-4, atol=1e-9)

    # in the trainer: fresh adapters are the base, so the outside costs nothing until the adapter moves
    keys = example_keys(r.train.seed, 0, batch["positions"], t.data.examples_per_step)
    _, logs = t.compute_loss(batch)
    fresh = float(logs["loss"])
    randomise(t.comps.denoiser, 3)
    text = t.encode_text(batch["captions"], keys)
    ex = t.objective.example(batch["latents"], [example_generator(k) for k in keys])
    moved = base_predictions(t, ex, text, batch, keys, base_rows(t, batch))
    with torch.no_grad():
        adapted = t.comps.family.predict(t.comps.denoiser, ex.noisy, ex.timesteps, text, batch)
    assert float((adapted - moved).abs().max()) > 1e-3  # the base rows are the base's, not the adapted model's
    _, logs = t.compute_loss(batch)
    assert float(logs["loss"]) != pytest.approx(fresh)


def test_masks_toward_the_base_need_switchable_adapters(tmp_path, tiny_base):
    from finetune.errors import UserError
    from finetune.recipe import load_recipe
    from tests.helpers import write_recipe

    images = _masked_images(tmp_path / "images")
    path = write_recipe(tmp_path, tiny_base, images, data={"masks": {"unmasked_target": "base"}})
    data = yaml.safe_load(path.read_text())
    data["method"] = {"name": "full"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "data.masks.unmasked_target" in str(err.value) and "\n" not in str(err.value)
