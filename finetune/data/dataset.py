"""The trainer's view of the data: `build_train_data(recipe, ...)` -> TrainData with a per-epoch loader.

    data = build_train_data(recipe, num_replicas, rank, latent_encoder=vae_encode, latent_key="vae:ab12:fp16")
    for batch in data.loader(epoch, start_batch=k): ...

Each DataLoader item is a whole batch (planned in plan.py), so skipping batches on resume costs nothing
and one bucket per batch holds by construction. One DataLoader serves every epoch: its workers persist,
so decoded, resized images (and cache entries read from disk) stay in their memory across epochs while a
budget allows; crop and flip are per sighting.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.data.cache import Cache, entry_key, fill, split_batch
from finetune.data.captions import apply_rules
from finetune.data.images import BadImage, Cover, cover, crop_flip, decode, resize
from finetune.data.masks import mask_digest, mask_pixels, to_latent
from finetune.data.pairs import Pairs, cond_name
from finetune.data.plan import Example, Planner
from finetune.data.scan import Scan, scan_data, summarize
from finetune.data.video import BadVideo
from finetune.errors import DataError

MEMO_BYTES = 1 << 30  # decoded, resized images kept per process; beyond this, decode again each sighting


class Render:
    """Turns planned examples into tensors. Lives in DataLoader workers, so it holds only picklable state."""

    def __init__(self, records, crop: str, latents: Cache | None, latent_key: str, flips: bool,
                 text: Cache | None, text_key: str, masks=None, pairs: Pairs | None = None):
        self.records, self.crop, self.masks = records, crop, masks
        self.latents, self.latent_key, self.flips = latents, latent_key, flips
        self.text, self.text_key = text, text_key
        self.pairs = pairs  # paired data: how conditioning images are sized, and who reads them
        self.memo: dict[tuple, np.ndarray] = {}
        self.memo_bytes = 0

    def cover(self, ex_record: int, bucket, seed: int = 0) -> Cover:
        return cover(self.records[ex_record].size, bucket, self.crop, seed)

    def latent_entry(self, record: int, bucket) -> str:
        rec, c = self.records[record], self.cover(record, bucket)
        parts = ["latents", rec.digest, bucket, [c.rh, c.rw, c.top, c.left], self.flips, self.latent_key]
        if rec.clip is not None:  # which frames of the source: the clip sampling settings (fps, frames, mode)
            parts.append(list(rec.clip))
        if self.masks is not None:  # the entry holds the mask too: a changed mask is a new entry
            parts.append(mask_digest(rec, self.masks))
        if rec.conditions:  # ... and the conditioning latents: every input is in the key
            parts.append(self.condition_parts(record, bucket))
        return entry_key(*parts)

    def condition_parts(self, record: int, bucket) -> list:
        """What makes a record's conditioning images what they are at this bucket: bytes, role, geometry."""
        parts = []
        for c in self.records[record].conditions:
            size, cut, own = self.pairs.geometry(c, self.cover(record, bucket), bucket)
            parts.append([c.digest, c.role, list(size), [cut.top, cut.left], list(own)])
        return parts

    def mask(self, record: int, bucket, flip: bool = False, seed: int = 0) -> torch.Tensor:
        """[1, H, W] in [0, 1]: the record's loss mask, resized, cropped and flipped like its pixels."""
        arr = mask_pixels(self.records[record], self.masks, self.cover(record, bucket, seed), bucket, flip)
        return torch.from_numpy(arr)[None]

    def text_entry(self, caption: str, record: int | None = None, bucket=None) -> str:
        if self.pairs is not None and self.pairs.text_reads:  # the text encoder sees the conditioning images
            return entry_key("text", caption, self.text_key, self.condition_parts(record, bucket))
        return entry_key("text", caption, self.text_key)

    def conditions(self, record: int, bucket, flip: bool = False, seed: int = 0) -> list[torch.Tensor]:
        """The record's conditioning images, each [3, h, w] in [-1, 1]: spatial ones cut exactly as the target
        (same resize, crop and flip), references resized on their own (data.conditioning.role)."""
        c, out = self.cover(record, bucket, seed), []
        for j, cond in enumerate(self.records[record].conditions):
            size, cut, own = self.pairs.geometry(cond, c, bucket)
            arr = self._decoded(("condition", record, j, size), cond, size)
            arr, _ = crop_flip(arr, cut, own, flip and cond.role == "spatial")
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0))
        return out

    def resized(self, record: int, bucket, c: Cover) -> np.ndarray:
        """The image resized to cover the bucket: decoded once, then reused while the budget allows."""
        return self._decoded((record, bucket), self.records[record], (c.rh, c.rw))

    def _decoded(self, key: tuple, image, size: tuple[int, int]) -> np.ndarray:
        arr = self.memo.get(key)
        if arr is not None:
            return arr
        try:
            arr = self._decode_media(image, size)
        except (BadImage, BadVideo, OSError) as e:
            raise DataError(f"{image.key}: {e}; it changed since the data was scanned, fix it and restart") from None
        if self.memo_bytes + arr.nbytes <= MEMO_BYTES:
            self.memo[key] = arr
            self.memo_bytes += arr.nbytes
        return arr

    @staticmethod
    def _decode_media(image, size: tuple[int, int]) -> np.ndarray:
        """uint8 [h, w, 3] (an image) or [F, h, w, 3] (a clip's frames), resized to `size`."""
        if getattr(image, "clip", None) is None:  # an image, or a conditioning image
            return resize(decode(image.read(), need=size), *size)
        from finetune.data.video import clip_pixels
        from finetune.data.video_sources import decode_clip

        return clip_pixels(decode_clip(image), *size)

    def pixels(self, record: int, bucket, flip: bool = False, seed: int = 0) -> tuple[torch.Tensor, int, int]:
        """[3, H, W] in [-1, 1] ([3, F, H, W] for a clip; with data.video an image is [3, 1, H, W]), and the crop's
        (top, left) as SDXL conditioning sees it."""
        c = self.cover(record, bucket, seed)
        arr, left = crop_flip(self.resized(record, bucket, c), c, bucket, flip)
        t = torch.from_numpy(arr.copy()).float()  # copy: PIL arrays are read-only
        t = t.permute(3, 0, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)
        if len(bucket) == 3 and t.ndim == 3:
            t = t.unsqueeze(1)  # an image among clips: a one-frame clip
        return t.div_(127.5).sub_(1.0), c.top, left

    def batch(self, examples: list[Example]) -> dict:
        tops, pix, lat, masks, conds, refs, ref_pix = [], [], [], [], [], [], []
        for ex in examples:
            if self.latents is not None:
                c = self.cover(ex.record, ex.bucket)
                entry = self.latents.get(self.latent_entry(ex.record, ex.bucket))
                end = "_flip" if ex.flip else ""
                lat.append(entry[f"latents{end}"].float())
                conds.append({k[5:len(k) - len(end)]: v.float() for k, v in entry.items()
                              if k.startswith("cond.") and k.endswith("_flip") == bool(end)})
                tops.append((c.top, c.rw - c.left - ex.bucket[1] if ex.flip else c.left))
                if self.masks is not None:
                    masks.append(entry["mask_flip" if ex.flip else "mask"].float())
                refs.append([entry[cond_name(j, ex.flip and f"cond_{j}_flip" in entry)].float()
                             for j in range(len(self.records[ex.record].conditions))])
            else:
                t, top, left = self.pixels(ex.record, ex.bucket, ex.flip, ex.crop_seed)
                pix.append(t)
                tops.append((top, left))
                if self.masks is not None:
                    masks.append(self.mask(ex.record, ex.bucket, ex.flip, ex.crop_seed))
            if self.pairs is not None and (self.latents is None or self.pairs.text_reads and self.text is None):
                ref_pix.append(self.conditions(ex.record, ex.bucket, ex.flip, ex.crop_seed))
        out = {"latents": torch.stack(lat)} if lat else {"pixel_values": torch.stack(pix)}
        if conds and conds[0]:  # cached conditions of the family (image-to-video's first frame)
            out["conditions"] = {k: torch.stack([c[k] for c in conds]) for k in conds[0]}
        if any(refs):  # paired data, one tensor per conditioning image: [B, C, h, w] latents ...
            out["references"] = [torch.stack(group) for group in zip(*refs, strict=True)]
        if ref_pix:  # ... or [B, 3, H, W] pixels
            out["reference_pixels"] = [torch.stack(group) for group in zip(*ref_pix, strict=True)]
        if masks:  # in [0, 1]; the loss weighs it (data.masks.unmasked_weight / unmasked_target)
            out["loss_mask"] = torch.stack(masks)
            out["masked"] = torch.tensor([bool(float(m.min()) < 1.0) for m in masks], dtype=torch.bool)
        out["captions"] = [ex.caption for ex in examples]
        if self.text is not None:
            entries = [self.text.get(self.text_entry(ex.caption, ex.record, ex.bucket)) for ex in examples]
            out["text"] = {k: stack_padded([e[k] for e in entries]) for k in entries[0]}
        out["original_size"] = torch.tensor([self.records[ex.record].size for ex in examples], dtype=torch.long)
        out["crop_top_left"] = torch.tensor(tops, dtype=torch.long)
        out["target_size"] = torch.tensor([ex.bucket[:2] for ex in examples], dtype=torch.long)
        out["paths"] = [self.records[ex.record].key for ex in examples]
        out["is_prior"] = torch.tensor([ex.is_prior for ex in examples], dtype=torch.bool)
        out["preserve"] = torch.tensor([ex.preserve for ex in examples], dtype=torch.bool)
        out["positions"] = torch.tensor([ex.position for ex in examples], dtype=torch.long)
        return out


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack cached text of one key; prompts of different lengths (a family that pads each batch to its longest
    and masks the padding: Qwen-Image-Edit) are right-padded with zeros, which their masks mark as padding."""
    if tensors[0].ndim == 0 or all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    longest = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == longest for t in tensors):
        return torch.stack(tensors)
    return torch.stack([torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])]) for t in tensors])


class _Batches(Dataset):
    """Renders a planned batch: the sampler hands over the batch's examples themselves."""

    def __init__(self, render: Render):
        self.render = render

    def __getitem__(self, examples: list[Example]) -> dict:
        return self.render.batch(examples)


class _EpochPlan(Sampler):
    """The batches of the epoch being iterated, set before each epoch; the loader reads it at each `iter`."""

    def __init__(self):
        self.batches: list[list[Example]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _Loader:
    """One epoch of the persistent DataLoader. Its user errors stay one line: a worker's DataError arrives
    wrapped in its traceback text, and we keep the original message (its last line)."""

    def __init__(self, loader: DataLoader, batches: list[list[Example]]):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.loader.sampler.batches = self.batches  # set when iterated: one epoch at a time
        it = iter(self.loader)
        try:
            yield from it
        except DataError as e:
            # stop the workers now: the traceback keeps the iterator alive, and its shutdown at garbage
            # collection waits seconds per worker
            getattr(it, "_shutdown_workers", lambda: None)()
            lines = str(e).strip().splitlines()
            if len(lines) == 1:
                raise
            raise DataError(lines[-1].removeprefix("finetune.errors.DataError: ")) from None


class TrainData:
    """What the trainer iterates. Batches per epoch are the same on every rank and every epoch."""

    def __init__(self, scan: Scan, planner: Planner, render: Render, num_workers: int, notes: list[str]):
        self.scan, self.planner, self.render = scan, planner, render
        self.num_workers, self.notes = num_workers, notes
        self.fingerprint = scan.fingerprint()
        self.num_images = scan.num_images
        self.num_examples_per_epoch = scan.num_examples
        self.batches_per_epoch = planner.batches_per_epoch
        self.examples_per_step = planner.examples_per_step
        self._loader: DataLoader | None = None

    def plan(self, epoch: int) -> list[list[Example]]:
        return self.planner.epoch(epoch)

    def loader(self, epoch: int, start_batch: int = 0) -> Iterable[dict]:
        """This rank's batches of `epoch` from `start_batch` on; the skipped ones are never decoded.
        Iterate one epoch at a time: every epoch shares the one DataLoader and its workers."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.batches_per_epoch}")
        if self._loader is None:
            # built once: a new DataLoader per epoch starts new workers (a stall each epoch, and DreamBooth
            # epochs are a handful of steps) whose decode memo starts empty
            workers = min(self.num_workers, self.batches_per_epoch)
            self._loader = DataLoader(
                _Batches(self.render), batch_size=None, sampler=_EpochPlan(), num_workers=workers,
                pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None,
                persistent_workers=workers > 0,
            )
        return _Loader(self._loader, self.plan(epoch)[start_batch:])

    def close(self) -> None:
        """Let the persistent workers go (they also go when this object is collected)."""
        self._loader = None

    def summary(self) -> str:
        p = self.planner
        per = f"{p.batch_size} + {p.batch_size} class images" if p.prior else str(p.batch_size)
        if p.preserve_batch:
            per = f"{p.instance_batch} + {p.preserve_batch} preservation examples (toward the base's prediction)"
        extra = [f"batches per epoch: {self.batches_per_epoch} per rank x {p.num_replicas} rank(s), "
                 f"batch size {per}, last batch of a bucket filled from the same bucket"] + self.notes
        return summarize(self.scan, p.seed, extra)


def _cache_root(recipe, sub: str) -> Path | None:
    d = recipe.data
    if d.cache_in_memory:
        return None
    return Path(d.cache_dir or Path(recipe.train.output_dir) / "cache") / sub


def _latent_jobs(planner: Planner, render: Render):
    pairs = [(r, b) for b, members in planner.groups.items() for r in dict.fromkeys(members)]
    # class images and preservation examples meet every bucket
    pairs += [(r, b) for r in dict.fromkeys(planner.prior + planner.pool) for b in planner.groups]
    return [(render.latent_entry(r, b), b, (r, b)) for r, b in pairs]


def _encode_latents(render: Render, encoder: Callable, flips: bool):
    def encoded(px) -> dict[str, torch.Tensor]:  # the latents, and any 'cond.*' conditions the family derives
        out = encoder(px)
        return out if isinstance(out, dict) else {"latents": out}

    def run(payloads):
        px = torch.stack([render.pixels(r, b)[0] for r, b in payloads])
        out = encoded(px)
        if flips:
            out |= {f"{k}_flip": v for k, v in encoded(px.flip(-1)).items()}
        if render.pairs is not None:  # the conditioning images, in the same entry (their inputs are in its key)
            conds = [render.conditions(r, b) for r, b in payloads]
            for j, cond in enumerate(render.records[payloads[0][0]].conditions):
                cpx = torch.stack([c[j] for c in conds])
                out[f"cond_{j}"] = encoded(cpx)["latents"]
                if flips and cond.role == "spatial":
                    out[f"cond_{j}_flip"] = encoded(cpx.flip(-1))["latents"]
        if render.masks is not None:  # stored at the latent grid: what the loss reads
            m = torch.stack([render.mask(r, b) for r, b in payloads])
            out["mask"] = to_latent(m, out["latents"].shape[-2:]).to(out["latents"].device)
            if flips:
                out["mask_flip"] = out["mask"].flip(-1)
        return split_batch(out, len(payloads))

    return run


def _fixed_captions(planner: Planner) -> set[str]:
    """Every caption training will use; fixed because the recipe refuses text caching with varying rules
    (class images keep their class prompt as is)."""
    return {_fixed_caption(planner, r) for r in range(len(planner.records))}


def _fixed_caption(planner: Planner, r: int) -> str:
    rec, rules = planner.records[r], planner.rules[r]
    return rec.caption if rules is None else apply_rules(rec.caption, rules)


def _text_jobs(planner: Planner, render: Render):
    """(key, group, payload) per caption to encode; where the text encoder sees the conditioning images, per
    caption and record (grouped by bucket: one encoder call takes images of one size)."""
    if render.pairs is None or not render.pairs.text_reads:
        return [(render.text_entry(c), 0, (c, None, None)) for c in sorted(_fixed_captions(planner))]
    jobs = []
    for _, bucket, (r, b) in _latent_jobs(planner, render):
        captions = {_fixed_caption(planner, r)}
        if planner.preservation is not None and planner.preservation.prompt and r in planner.pool:
            captions.add(planner.preservation.prompt)
        jobs += [(render.text_entry(c, r, b), bucket, (c, r, b)) for c in sorted(captions)]
    return jobs


def _encode_text(render: Render, encoder: Callable):
    def run(payloads):
        captions = [c for c, _, _ in payloads]
        if payloads[0][1] is None:
            return split_batch(encoder(captions), len(payloads))
        conds = [render.conditions(r, b) for _, r, b in payloads]
        images = [torch.stack(group) for group in zip(*conds, strict=True)]
        return split_batch(encoder(captions, images), len(payloads))

    return run


def _fill_caches(recipe, planner, render, latent_encoder, text_encoder, show, share, barrier) -> list[str]:
    """Fill the caches, each process its share of a disk cache (an in-memory cache: each process all of it);
    after the barrier a pass over the whole list encodes whatever no process wrote where this one can read
    it (another machine's local disk)."""
    notes, bs = [], recipe.train.batch_size
    if render.latents is not None:
        jobs = _latent_jobs(planner, render)
        if latent_encoder is None and any(not render.latents.has(k) for k, _, _ in jobs):
            raise ValueError("data.cache_latents needs a latent_encoder to fill missing cache entries")
        encode = _encode_latents(render, latent_encoder, render.flips)
        n = _fill_shared(render.latents, jobs, bs, encode, "caching latents", show, share, barrier)
        notes.append(f"latent cache: {len({k for k, _, _ in jobs})} entries, {n} encoded now "
                     f"({render.latents.root or 'in memory'})")
        render.memo.clear()  # pixels are not needed again once latents exist
        render.memo_bytes = 0
    if render.text is not None:
        jobs = _text_jobs(planner, render)
        if text_encoder is None and any(not render.text.has(k) for k, _, _ in jobs):
            raise ValueError("data.cache_text needs a text_encoder to fill missing cache entries")
        encode = _encode_text(render, text_encoder)
        n = _fill_shared(render.text, jobs, bs, encode, "caching text embeddings", show, share, barrier)
        notes.append(f"text cache: {len({k for k, _, _ in jobs})} captions, {n} encoded now "
                     f"({render.text.root or 'in memory'})")
    return notes


def _fill_shared(cache: Cache, jobs, bs, encode, desc, show, share, barrier) -> int:
    if cache.root is None or not cache.write or share[1] == 1:
        return fill(cache, jobs, bs, encode, desc, show)
    n = fill(cache, jobs, bs, encode, desc, show, share)
    barrier()  # every share is on disk (or its process failed, and the launcher stops us all)
    return n + fill(cache, jobs, bs, encode, desc, show)


def build_train_data(
    recipe,
    num_replicas: int = 1,
    rank: int = 0,
    latent_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    latent_key: str = "",
    text_encoder: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    text_key: str = "",
    show_progress: bool = True,
    barrier: Callable[[], None] | None = None,
    scan: Scan | None = None,
    text_reads_conditions: bool = False,
) -> TrainData:
    """Scan the sources (unless `scan` is the scan already made), plan batches for this rank and fill the caches
    the recipe asks for. With several processes and a `barrier` (every process calls this together) each encodes
    and writes its share of the missing cache entries, then all read all of them. Without a barrier only rank 0
    writes cache files and other ranks encode what is missing into memory: run rank 0 first then.
    `text_reads_conditions`: the text encoder also takes the conditioning images (`text_encoder(captions,
    images)`), so cached text is keyed on them."""
    d = recipe.data
    scan = scan or scan_data(d, verbose=show_progress)  # `scan`: the trainer's, done before any model loaded
    planner = Planner(scan, recipe.train.batch_size, recipe.train.seed, num_replicas, rank,
                      recipe.train.gradient_accumulation)
    write = rank == 0 or barrier is not None
    latents = Cache(_cache_root(recipe, "latents"), write=write) if d.cache_latents else None
    text = Cache(_cache_root(recipe, "text"), write=write) if d.cache_text is True else None
    pairs = Pairs(d.conditioning, d.resolution, text_reads_conditions) if d.conditioning else None
    render = Render(planner.records, d.crop, latents, latent_key, d.random_flip, text, text_key, d.masks, pairs)
    share = (rank, num_replicas) if barrier is not None else (0, 1)
    notes = _fill_caches(recipe, planner, render, latent_encoder, text_encoder, show_progress, share,
                         barrier)
    data = TrainData(scan, planner, render, d.num_workers, notes)
    if show_progress:
        print(data.summary(), file=sys.stderr)
    return data
