"""The order of an epoch: which examples form each batch, with their caption, flip and crop seed.

Pure Python and cheap, so an epoch is planned whole in the main process: a resumed run plans the
same epoch and skips batches without decoding a single image, and every rank agrees on the plan.

- An example is one sighting of a record; a record is seen `repeats` times per epoch.
- The epoch is cut into *global* batches (one optimizer step: batch_size x num_replicas x
  accumulation examples of one bucket); a bucket's last global batch is filled up with other examples
  of the same bucket (drawn at random), so every example is seen each epoch and every batch is full.
- Micro-batch m of rank r is slice (m x num_replicas + r) of its global batch. The global batches
  depend only on that product, so 2 processes at batch 4, or 1 process at batch 4 accumulating 2, see
  exactly what 1 process at batch 8 sees (same examples, captions, flips and crops), and an epoch always
  ends on an optimizer step.
- With prior preservation every batch gets `batch_size` class images appended (is_prior=True), drawn
  in a per-epoch shuffled cycle and rendered at the batch's bucket: the classic DreamBooth 1:1 batch.
- With base-prediction preservation (data.preservation) `round(share x batch_size)` places of every
  micro-batch go to preservation examples (preserve=True), drawn the same way from the preserve: true
  sources (or, with none marked, from the instance images re-captioned with the preservation prompt);
  the other places hold instance examples.
- Every example carries its position in the step's global batch (instance k, class image size + k):
  the trainer keys each example's noise and timestep (and Textual Inversion its caption template) by it,
  so they too ignore how the step is split into micro-batches and processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.data.captions import apply_rules, rng_for
from finetune.data.records import Record


@dataclass(frozen=True)
class Example:
    record: int  # index into Planner.records
    bucket: tuple[int, ...]  # (h, w), or (h, w, frames) for clips
    caption: str  # after the caption rules
    flip: bool
    crop_seed: int
    is_prior: bool = False
    preserve: bool = False  # trains toward the base's own prediction (data.preservation)
    position: int = 0  # place in its optimizer step's global batch (class images after all instance ones)


class Planner:
    def __init__(self, scan, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 accumulation: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank, self.accumulation = num_replicas, rank, accumulation
        self.random_flip = scan.data.random_flip
        self.records: list[Record] = []
        self.rules = []  # per record
        self.groups: dict[tuple[int, int], list[int]] = {}  # bucket -> record indices, repeats included
        self.pool: list[int] = []  # preservation examples' records, repeats included
        for i, sub in enumerate(scan.subsets):
            for rec, bucket in zip(sub.records, scan.assigned[i], strict=True):
                target = self.pool if sub.preserve else self.groups.setdefault(bucket, [])
                target.extend([len(self.records)] * sub.repeats)
                self.records.append(rec)
                self.rules.append(sub.rules)
        self.preservation = scan.data.preservation
        self.instance_batch, self.preserve_batch = batch_size, 0
        if self.preservation is not None:
            if not self.pool:  # no marked source: the instance images, re-captioned with the prompt
                self.pool = sorted({r for members in self.groups.values() for r in members})
            self.preserve_batch = min(max(round(batch_size * self.preservation.share), 1), batch_size - 1)
            self.instance_batch = batch_size - self.preserve_batch
        self.prior: list[int] = []
        if scan.prior is not None:
            self.prior = list(range(len(self.records), len(self.records) + len(scan.prior.records)))
            self.records += scan.prior.records
            self.rules += [None] * len(scan.prior.records)

    @property
    def global_batch(self) -> int:
        """Instance examples in one optimizer step, over all processes and micro-batches."""
        return self.instance_batch * self.num_replicas * self.accumulation

    @property
    def examples_per_step(self) -> int:
        """Examples in one optimizer step, over all processes and micro-batches (class images included)."""
        preserve = self.preserve_batch * self.num_replicas * self.accumulation
        return self.global_batch * (2 if self.prior else 1) + preserve

    @property
    def total_batches(self) -> int:
        """Global batches per epoch (each is one optimizer step)."""
        return sum(math.ceil(len(g) / self.global_batch) for g in self.groups.values())

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        return self.total_batches * self.accumulation

    def _global_order(self, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
        rng = rng_for("order", self.seed, epoch)
        size = self.global_batch
        batches = []
        for bucket in sorted(self.groups):
            group = list(self.groups[bucket])
            rng.shuffle(group)
            group += [rng.choice(self.groups[bucket]) for _ in range(-len(group) % size)]
            batches += [(bucket, group[i : i + size]) for i in range(0, len(group), size)]
        rng.shuffle(batches)
        return batches

    def _example(self, epoch: int, j: int, k: int, record: int, bucket, prior: bool,
                 preserve: bool = False) -> Example:
        rng = rng_for("example", self.seed, epoch, j, k)
        rec = self.records[record]
        if preserve and self.preservation.prompt:
            caption = self.preservation.prompt
        else:
            caption = rec.caption if prior else apply_rules(rec.caption, self.rules[record], rng)
        flip = self.random_flip and rng.random() < 0.5
        return Example(record, bucket, caption, flip, rng.getrandbits(32), prior, preserve, position=k)

    def epoch(self, epoch: int) -> list[list[Example]]:
        """This rank's batches of the epoch, in order."""
        size, b = self.global_batch, self.instance_batch
        cycle, pool = list(self.prior), list(self.pool)
        rng_for("prior", self.seed, epoch).shuffle(cycle)
        rng_for("preserve", self.seed, epoch).shuffle(pool)
        extra = size * (2 if cycle else 1)  # preservation positions come after instance and class examples
        p = self.preserve_batch
        out = []
        for j, (bucket, members) in enumerate(self._global_order(epoch)):
            for m in range(self.accumulation):
                # k: the example's position in the global batch, so its randomness ignores how it is split
                part = m * self.num_replicas + self.rank
                mine = range(part * b, part * b + b)
                batch = [self._example(epoch, j, k, members[k], bucket, False) for k in mine]
                for k in mine if cycle else ():
                    r = cycle[(j * size + k) % len(cycle)]
                    batch.append(self._example(epoch, j, size + k, r, bucket, True))
                for k in range(part * p, part * p + p):
                    r = pool[(j * self.num_replicas * self.accumulation * p + k) % len(pool)]
                    batch.append(self._example(epoch, j, extra + k, r, bucket, False, preserve=True))
                out.append(batch)
        return out
