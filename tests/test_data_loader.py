"""TrainData: batches, resume, sharding, prior preservation, latent and text caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.data import build_train_data
from finetune.recipe import validate


def image(path: Path, w: int = 96, h: int = 96, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def photo_set(root: Path, sizes: list[tuple[int, int]]) -> dict:
    for i, (w, h) in enumerate(sizes):
        image(root / f"{i:02d}.png", w, h, seed=i)
        (root / f"{i:02d}.txt").write_text(f"img{i}, red, blue, green")
    return {"type": "folder", "path": str(root)}


def recipe(tmp_path: Path, sources: list[dict], batch_size: int = 2, accumulation: int = 1, **data):
    data = {"sources": sources, "resolution": 128, "buckets": {"max_aspect": 3.0}, **data}
    train = {"batch_size": batch_size, "gradient_accumulation": accumulation, "seed": 5,
             "output_dir": str(tmp_path / "out")}
    return validate({"data": data, "method": {"name": "lora"}, "train": train})


MIXED = [(128, 128), (200, 130), (130, 200), (160, 160), (256, 128), (100, 100), (140, 140), (128, 256)]


class FakeVAE:
    """pixels [B,3,H,W] -> [B,4,H/8,W/8]; counts the images it encodes."""

    def __init__(self):
        self.images = 0

    def __call__(self, px: torch.Tensor) -> torch.Tensor:
        self.images += px.shape[0]
        pooled = F.avg_pool2d(px, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


class FakeTextEncoder:
    def __init__(self):
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.captions += captions
        emb = torch.tensor([[float(len(c))] * 8 for c in captions]).unsqueeze(1).expand(-1, 77, -1)
        return {"prompt_embeds": emb.clone(), "pooled": torch.arange(len(captions)).float()[:, None]}


def materialise(loader) -> list[dict]:
    return list(loader)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["paths"] == y["paths"] and x["captions"] == y["captions"]
        and torch.equal(x.get("pixel_values", x.get("latents")), y.get("pixel_values", y.get("latents")))
        for x, y in zip(a, b, strict=True)
    )


def test_batches_have_the_contract_keys(tmp_path):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", MIXED)], random_flip=True,
               caption={"shuffle_tags": True, "keep_tokens": 1})
    data = build_train_data(r, show_progress=False)
    assert data.num_images == 8 and data.num_examples_per_epoch == 8
    batches = materialise(data.loader(0))
    assert len(batches) == data.batches_per_epoch
    for b in batches:
        px = b["pixel_values"]
        assert px.dtype == torch.float32 and px.shape[0] == 2 and px.min() >= -1 and px.max() <= 1
        h, w = px.shape[-2:]
        assert b["target_size"].tolist() == [[h, w]] * 2  # one bucket per batch
        assert b["original_size"].dtype == torch.long and b["crop_top_left"].shape == (2, 2)
        assert all(c.startswith("img") for c in b["captions"]) and len(b["paths"]) == 2
        assert b["is_prior"].dtype == torch.bool and not b["is_prior"].any()
    assert len({tuple(b["target_size"][0].tolist()) for b in batches}) == 3  # square, wide, tall
    seen = {p for b in batches for p in b["paths"]}
    assert len(seen) == 8  # every image is seen each epoch
    text = data.summary()
    assert "buckets" in text and "128x128" in text and "batches per epoch" in text


def test_order_is_deterministic_and_changes_per_epoch(tmp_path):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * 8)], random_flip=True,
               caption={"shuffle_tags": True})
    a, b = build_train_data(r, show_progress=False), build_train_data(r, show_progress=False)
    assert same_batches(materialise(a.loader(1)), materialise(b.loader(1)))
    assert [x["paths"] for x in a.loader(0)] != [x["paths"] for x in a.loader(1)]


def test_resume_skips_batches_without_decoding(tmp_path, monkeypatch):
    import finetune.data.dataset as ds

    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * 12)], random_flip=True)
    full = materialise(build_train_data(r, show_progress=False).loader(2))
    decoded = []
    monkeypatch.setattr(ds, "decode", lambda data, need=None: decoded.append(1) or real_decode(data, need))
    resumed = materialise(build_train_data(r, show_progress=False).loader(2, start_batch=4))
    assert same_batches(full[4:], resumed)
    assert len(decoded) == 4  # only the two remaining batches of two images were decoded


real_decode = __import__("finetune.data.images", fromlist=["decode"]).decode


@pytest.mark.parametrize("n_images", [8, 10, 1])
def test_two_replicas_get_disjoint_equal_shares(tmp_path, n_images):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * n_images)])
    ranks = [build_train_data(r, num_replicas=2, rank=k, show_progress=False) for k in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch >= 1
    shares = [[p for b in d.loader(0) for p in b["paths"]] for d in ranks]
    assert len(shares[0]) == len(shares[1]) == 2 * ranks[0].batches_per_epoch
    if n_images > 1:
        assert not set(shares[0]) & set(shares[1])


def test_tiny_set_still_gives_full_batches(tmp_path):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)])], batch_size=4)
    data = build_train_data(r, show_progress=False)
    batches = materialise(data.loader(0))
    assert data.batches_per_epoch == 1 and batches[0]["pixel_values"].shape[0] == 4


def test_prior_preservation_pairs_class_images(tmp_path):
    for i in range(3):
        image(tmp_path / "cls" / f"{i}.png", 128, 128, seed=10 + i)
    inst = {"type": "instance", "path": photo_set(tmp_path / "inst", MIXED[:4])["path"], "instance_prompt": "sks"}
    prior = {"class_prompt": "a dog", "class_dir": str(tmp_path / "cls"), "num_class_images": 3}
    data = build_train_data(recipe(tmp_path, [inst], prior=prior), show_progress=False)
    for b in data.loader(0):
        assert b["is_prior"].tolist() == [False, False, True, True]
        assert b["captions"][2:] == ["a dog", "a dog"]
        assert b["pixel_values"].shape[0] == 4 and all("cls" in p for p in b["paths"][2:])
    assert "2 + 2 class images" in data.summary()


@pytest.mark.parametrize("prior", [False, True], ids=["plain", "prior"])
def test_positions_name_the_same_examples_however_a_step_is_split(tmp_path, prior):
    """Each example's position in its step's global batch (what noise, timesteps and TI templates are keyed
    by) names the same image, caption and flip for batch 4, 2 x 2 accumulated and 2 processes x 2."""
    extra = {}
    sources = [photo_set(tmp_path / "set", [(128, 128)] * 8)]
    if prior:
        for i in range(3):
            image(tmp_path / "cls" / f"{i}.png", 128, 128, seed=10 + i)
        extra["prior"] = {"class_prompt": "a dog", "class_dir": str(tmp_path / "cls"), "num_class_images": 3}
    layouts = {"batch 4": (4, 1, 1), "2 x 2 accumulated": (2, 2, 1), "2 processes x 2": (2, 1, 2)}
    seen = {}
    for name, (batch, accumulation, processes) in layouts.items():
        r = recipe(tmp_path, sources, batch_size=batch, accumulation=accumulation, random_flip=True,
                   caption={"shuffle_tags": True}, **extra)
        examples = {}
        for rank in range(processes):
            data = build_train_data(r, num_replicas=processes, rank=rank, show_progress=False)
            assert data.examples_per_step == 4 * (2 if prior else 1)
            for i, b in enumerate(data.loader(0)):
                for k, pos in enumerate(b["positions"].tolist()):
                    key = (i // accumulation, pos)  # (optimizer step, position)
                    assert key not in examples, (name, key)
                    examples[key] = (b["paths"][k], b["captions"][k], float(b["pixel_values"][k].sum()))
        seen[name] = examples
    assert seen["batch 4"] == seen["2 x 2 accumulated"] == seen["2 processes x 2"]
    assert sorted(pos for step, pos in seen["batch 4"] if step == 0) == list(range(8 if prior else 4))


def test_worker_processes_give_the_same_batches(tmp_path):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", MIXED)], random_flip=True)
    one = materialise(build_train_data(r, show_progress=False).loader(0))
    r2 = recipe(tmp_path, [photo_set(tmp_path / "set", MIXED)], random_flip=True, num_workers=2)
    assert same_batches(one, materialise(build_train_data(r2, show_progress=False).loader(0)))


# ---------------------------------------------------------------------------------------------- caches
def test_latent_cache_reuse_and_invalidation(tmp_path):
    src = photo_set(tmp_path / "set", MIXED)
    r = recipe(tmp_path, [src], cache_latents=True, random_flip=True)
    vae = FakeVAE()
    data = build_train_data(r, latent_encoder=vae, latent_key="fake:fp32", show_progress=False)
    assert vae.images == 2 * 8  # both flips of every image
    files = list((tmp_path / "out" / "cache" / "latents").rglob("*.safetensors"))
    assert len(files) == 8 and not list((tmp_path / "out" / "cache").rglob("*.tmp"))
    batch = next(iter(data.loader(0)))
    assert "pixel_values" not in batch and batch["latents"].shape[1] == 4
    assert batch["latents"].dtype == torch.float32

    again = FakeVAE()
    build_train_data(r, latent_encoder=again, latent_key="fake:fp32", show_progress=False)
    assert again.images == 0  # reused

    image(tmp_path / "set" / "03.png", 160, 160, seed=99)  # one image changes
    changed = FakeVAE()
    build_train_data(r, latent_encoder=changed, latent_key="fake:fp32", show_progress=False)
    assert changed.images == 2  # exactly that one, both flips

    other = FakeVAE()
    build_train_data(r, latent_encoder=other, latent_key="fake:fp16", show_progress=False)
    assert other.images == 16  # another encoder identity misses everything


def test_cached_latents_match_the_flip_of_each_example(tmp_path):
    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * 4)], cache_latents=True,
               random_flip=True, cache_in_memory=True)
    vae = FakeVAE()
    data = build_train_data(r, latent_encoder=vae, latent_key="k", show_progress=False)
    assert not (tmp_path / "out" / "cache").exists()  # in memory: nothing written
    pix = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * 4)], random_flip=True)
    for lb, pb in zip(data.loader(3), build_train_data(pix, show_progress=False).loader(3), strict=True):
        assert lb["paths"] == pb["paths"]
        assert torch.allclose(lb["latents"], FakeVAE()(pb["pixel_values"]), atol=1e-5)
        assert torch.equal(lb["crop_top_left"], pb["crop_top_left"])


def test_text_cache_reuse_and_invalidation(tmp_path):
    src = photo_set(tmp_path / "set", [(128, 128)] * 4)
    rules = {"template": "{trigger}, {caption}", "trigger": "zzz"}
    r = recipe(tmp_path, [src], cache_text=True, caption=rules)
    enc = FakeTextEncoder()
    data = build_train_data(r, text_encoder=enc, text_key="clip-l", show_progress=False)
    assert sorted(enc.captions) == [f"zzz, img{i}, red, blue, green" for i in range(4)]
    b = next(iter(data.loader(0)))
    assert b["text"]["prompt_embeds"].shape == (2, 77, 8) and b["text"]["pooled"].shape == (2, 1)
    assert b["text"]["prompt_embeds"][0, 0, 0] == len(b["captions"][0])

    again = FakeTextEncoder()
    build_train_data(r, text_encoder=again, text_key="clip-l", show_progress=False)
    assert again.captions == []
    (tmp_path / "set" / "01.txt").write_text("new words")
    changed = FakeTextEncoder()
    build_train_data(r, text_encoder=changed, text_key="clip-l", show_progress=False)
    assert changed.captions == ["zzz, new words"]


def test_changed_data_changes_the_fingerprint(tmp_path):
    src = photo_set(tmp_path / "set", [(128, 128)] * 3)
    first = build_train_data(recipe(tmp_path, [src]), show_progress=False).fingerprint
    image(tmp_path / "set" / "00.png", 128, 128, seed=42)
    assert build_train_data(recipe(tmp_path, [src]), show_progress=False).fingerprint != first
    more = build_train_data(recipe(tmp_path, [{**src, "repeats": 2}]), show_progress=False).fingerprint
    assert more != first


@pytest.mark.parametrize("workers", [0, 2])
def test_image_broken_after_the_scan_is_a_one_line_error(tmp_path, workers):
    from finetune.errors import DataError

    r = recipe(tmp_path, [photo_set(tmp_path / "set", [(128, 128)] * 4)], num_workers=workers)
    data = build_train_data(r, show_progress=False)
    for p in (tmp_path / "set").glob("*.png"):
        p.write_bytes(b"broken")
    with pytest.raises(DataError) as e:
        list(data.loader(0))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path / "set"))
