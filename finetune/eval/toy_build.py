"""Build the tiny evaluation models of the toy world, committed in finetune/eval/toy_models/ (`toy` in
validation.clip_model / dino_model and tools/evaluate.py):

    python -m finetune.eval.toy_build             # both models, a few minutes on one CPU core

- `clip`: a CLIPModel (ViT 64 px, patch 8, 3 layers x 64; text 2 layers x 64; 64-d joint space) trained
  contrastively on toy images and their captions, with a BPE tokenizer trained on the same captions (the
  real CLIP vocabulary would make the text tower 40x larger than everything else).
- `dino`: a ViTModel of the same shape trained self-supervised, SimCLR-style (two augmented views of an
  image must agree, all other images disagree) with DINO's augmentations: crops, flips, colour jitter and
  greyscale, so colour alone cannot match two views. The class token is the embedding, as with DINO.

The training images are the world, the held-out subjects and their class images (real CLIP and DINO have
seen dogs before anyone fine-tunes on a dog), plus pixel-shuffled world images. Real models learned from
billions of natural images that texture without structure is not an object; 2,000 smooth drawings teach
nothing about it, so the shuffled images are in the data (captioned "noise" for CLIP) and, for the
self-supervised model, also serve as hard negatives of the images they were shuffled from.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.eval.embedders import TOY_DIR
from finetune.toy import world

SIDE = world.SIZE
WIDTH = 64
VISION = dict(image_size=SIDE, patch_size=8, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=3,
              num_attention_heads=4)


# ------------------------------------------------------------------------------------------------- data
def shuffle_pixels(img, seed: int):
    """The same pixels in a random order: colours kept, every shape destroyed."""
    from PIL import Image

    arr = np.asarray(img.convert("RGB")).reshape(-1, 3).copy()
    np.random.default_rng(seed).shuffle(arr)
    return Image.fromarray(arr.reshape(img.height, img.width, 3))


def training_set(seed: int = 7, n_world: int = 1200, n_subject: int = 120, n_noise: int = 200):
    """[(image, [captions])]: world images, held-out subjects and their class images, shuffled noise."""
    # every image is also captioned by its shape alone ('a heart'), which is what CLIP-T reads for 'a sks heart'
    items = [(img, [*caps, f"a {caps[0].split()[2]}"]) for img, caps in world.world_records(n_world, seed)]
    for name, subj in world.SUBJECTS.items():
        short = [f"a {subj.description} {subj.class_word}", f"{subj.description} {subj.class_word}",
                 f"a {subj.class_word}"]
        items += [(img, [cap, *short]) for img, cap in world.subject_images(name, n_subject, seed)]
        items += [(img, [cap, " ".join(cap.split()[:3]), f"a {subj.class_word}"])
                  for img, cap in world.class_images(name, n_subject, seed)]
    for i, (img, _) in enumerate(world.world_records(n_noise, seed + 1)):
        items.append((shuffle_pixels(img, seed * 100_003 + i), ["noise", "pixel noise"]))
    return items


def pixels(images) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1]: exactly what the saved image processors produce for 64 px images."""
    return torch.from_numpy(world.to_array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_tokenizer(captions: list[str]):
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(unk_token="<|unk|>")  # an unknown piece must not read as the end of the text
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789")
    trainer = BpeTrainer(vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>", "<|unk|>"],
                         end_of_word_suffix="</w>", initial_alphabet=alphabet, show_progress=False)
    tok.backend_tokenizer.train_from_iterator([*captions, " ".join(alphabet)], trainer=trainer)
    return tok


# ------------------------------------------------------------------------------------------ augmentation
def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(n, 1, 1, 1).uniform_(lo, hi, generator=g)


def colour_jitter(x: torch.Tensor, g: torch.Generator, hue: float = 0.1) -> torch.Tensor:
    """DINO's colour recipe on [-1, 1] images: brightness, contrast, saturation, hue, sometimes grey."""
    n = x.shape[0]
    x = x * 0.5 + 0.5
    x = x * _uniform(n, 0.6, 1.4, g)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(n, 0.6, 1.4, g) + mean
    grey = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    x = (x - grey) * _uniform(n, 0.6, 1.4, g) + grey
    angle = (torch.rand(n, generator=g) * 2 - 1) * hue * torch.pi  # rotate colours about the grey axis
    k = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = torch.eye(3) + torch.sin(angle)[:, None, None] * cross + (1 - torch.cos(angle))[:, None, None] * (cross @ cross)
    x = torch.einsum("nij,njhw->nihw", rot, x)
    grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand_as(x)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.2, grey, x)
    return x.clamp(0, 1) * 2 - 1


def crop_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random crop of 65-100% of the side, resized back, mirrored half the time."""
    n = x.shape[0]
    s = torch.empty(n).uniform_(0.65, 1.0, generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = s * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta[:, 1, 1] = s
    theta[:, 0, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - s)
    theta[:, 1, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - s)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def _shuffled(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flat = x.flatten(2)
    order = torch.argsort(torch.rand(x.shape[0], flat.shape[2], generator=g), dim=1)
    return torch.gather(flat, 2, order[:, None, :].expand(-1, x.shape[1], -1)).view_as(x)


# ------------------------------------------------------------------------------------------------ models
def _optimizer(params, steps: int, lr: float):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)


def train_clip(items, tok, steps: int = 300, batch: int = 128, seed: int = 0, log=print):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=tok.vocab_size, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=WIDTH))
    px, g, rng = pixels([im for im, _ in items]), torch.Generator().manual_seed(seed), random.Random(seed)
    opt, sched = _optimizer(model.parameters(), steps, 2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(items), (batch,), generator=g)
        texts = [rng.choice(items[i][1]) for i in idx.tolist()]
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=px[idx])
        # short captions repeat within a batch ('a heart'): images sharing a caption are all positives
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step}: contrastive loss {loss.item():.3f}")
    return model.eval()


def train_dino(items, steps: int = 300, batch: int = 128, seed: int = 0, temperature: float = 0.1, log=print):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**VISION))
    head = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.GELU(), torch.nn.Linear(4 * WIDTH, WIDTH))
    px, g = pixels([im for im, _ in items]), torch.Generator().manual_seed(seed)
    opt, sched = _optimizer([*model.parameters(), *head.parameters()], steps, 2e-3)
    target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
    for step in range(steps):
        x = px[torch.randint(0, len(items), (batch,), generator=g)]
        views = torch.cat([crop_flip(colour_jitter(x, g), g), crop_flip(colour_jitter(x, g), g), _shuffled(x, g)])
        z = F.normalize(head(model(pixel_values=views).last_hidden_state[:, 0]), dim=-1)
        logits = z[: 2 * batch] @ z.T / temperature  # the shuffled copies are candidates, never anchors
        logits[:, : 2 * batch].fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"dino step {step}: contrastive loss {loss.item():.3f}")
    return model.eval()


def save(out: Path, clip=None, tok=None, dino=None) -> None:
    from transformers import CLIPImageProcessor, ViTImageProcessor

    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if clip is not None:
        clip.save_pretrained(out / "clip")
        tok.save_pretrained(out / "clip")
        CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                           **norm).save_pretrained(out / "clip")
    if dino is not None:
        dino.save_pretrained(out / "dino")
        ViTImageProcessor(size={"height": SIDE, "width": SIDE}, **norm).save_pretrained(out / "dino")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build the toy world's tiny CLIP and DINO-style evaluation models.")
    p.add_argument("--out", type=Path, default=TOY_DIR, help="folder for clip/ and dino/")
    p.add_argument("--only", choices=["clip", "dino"], help="build one model")
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--dino-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the same numbers on any machine size
    start = time.perf_counter()
    items = training_set()
    record_path = args.out / "toy_build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"images": len(items), "seed": args.seed})
    if args.only in (None, "clip"):
        tok = train_tokenizer([c for _, caps in items for c in caps])
        save(args.out, clip=train_clip(items, tok, args.clip_steps, seed=args.seed), tok=tok)
        record["clip_steps"] = args.clip_steps
    if args.only in (None, "dino"):
        save(args.out, dino=train_dino(items, args.dino_steps, seed=args.seed))
        record["dino_steps"] = args.dino_steps
    seconds = round(time.perf_counter() - start)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} in {seconds}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
