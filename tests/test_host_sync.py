"""Host syncs per optimizer step, counted: a training step reads values from the device once (the step's
StepWatch report), however many micro-batches it has, with or without caches, with prior preservation;
and what that one read carries still guards the run (non-finite VAE latents, fp16 with a NaN loss).

On this CPU machine every read of a tensor's value counts (`.item()`, `float()`, `bool()`, `.tolist()`,
`.cpu()`, `nonzero`, ...), except of the batch the data loader hands over (on a GPU it stays on the host),
torch.optim's CPU step counters and the DataLoader's seed: an upper bound on the syncs on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import db_recipe, run_trainer, write_recipe


def count_step_reads(monkeypatch, recipe, *overrides):
    """Train `recipe`; returns (trainer, host reads made inside train_step and the loop's per-step logging)."""
    import finetune.train.loop as loop
    from finetune.train.sync import HostReads
    from finetune.train.trainer import Trainer

    reads = HostReads(cuda_only=False)
    step, after = Trainer.train_step, loop._after_step

    def train_step(self, batch):
        reads.exempt(batch)
        with reads.watching():
            return step(self, batch)

    def after_step(t, logs):
        with reads.watching():
            return after(t, logs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(loop, "_after_step", after_step)
    with reads, reads.pause():
        t = run_trainer(recipe, *overrides)
    return t, reads


@pytest.mark.parametrize("case", ["pixels, accumulation 2", "latent+text cache", "prior preservation"])
def test_one_host_read_per_optimizer_step(tmp_path, tiny_base, images, monkeypatch, case):
    train = {"max_steps": 4, "max_grad_norm": 1.0}
    if case == "prior preservation":
        recipe = db_recipe(tmp_path, tiny_base, images, train=train, logging={"every": 2})
    else:
        data = {"cache_latents": True, "cache_text": True} if "cache" in case else {}
        train |= {"gradient_accumulation": 2} if "accumulation" in case else {}
        recipe = write_recipe(tmp_path, tiny_base, images, train=train, data=data, logging={"every": 2})
    t, reads = count_step_reads(monkeypatch, recipe)
    assert t.state.step == 4
    assert reads.count == 4, f"{reads.count} host reads in 4 optimizer steps: {dict(reads.sites)}"
    assert all("sync.py" in site for site in reads.sites), dict(reads.sites)


def test_the_read_still_carries_the_loss_to_the_log(tmp_path, tiny_base, images):
    """The bar and loss.csv show each step's loss: read with the step's one read, not a read of its own."""
    t = run_trainer(write_recipe(tmp_path, tiny_base, images, train={"max_steps": 3}))
    rows = t.loss_log.read()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all(0 < r[1] < 10 for r in rows)


def test_non_finite_vae_latents_still_stop_the_run(tmp_path, tiny_base, images, monkeypatch):
    """Latents are checked by the step's one read now, not at encoding: the same one-line error."""
    from finetune.errors import RunError
    from finetune.train.trainer import Trainer

    encode = Trainer.encode_latents

    def nan_in_training(self, pixel_values, check=True):
        latents = encode(self, pixel_values, check)
        return latents if check else latents * float("nan")

    monkeypatch.setattr(Trainer, "encode_latents", nan_in_training)
    with pytest.raises(RunError, match="VAE produced non-finite latents"):
        run_trainer(write_recipe(tmp_path, tiny_base, images, train={"max_steps": 3, "on_nan": "skip"}))


def test_fp16_nan_loss_is_a_skip_and_the_scaler_goes_on(tmp_path, tiny_base, images, monkeypatch):
    """fp16, on_nan: skip, a NaN loss at step 2: that step is dropped (counted as a NaN skip) after its
    gradients were unscaled; the scaler's step state is closed, so the next steps unscale and train."""
    from finetune.train.trainer import Trainer

    original = Trainer.compute_loss

    def nan_once(self, batch):
        loss, logs = original(self, batch)
        if self.state.step == 1 and self.state.nan_skips == 0:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(Trainer, "compute_loss", nan_once)
    t = run_trainer(write_recipe(tmp_path, tiny_base, images,
                                 train={"mixed_precision": "fp16", "max_steps": 4, "on_nan": "skip"}))
    assert t.state.step == 4 and t.state.nan_skips == 1
    assert t.lr_scheduler.scheduler.last_epoch == 4
    assert all(torch.isfinite(p).all() for p in t.params.values())


def test_bench_profile_counts_one_read_per_step_and_writes_a_trace(tmp_path, tiny_base, images):
    """tools/bench.py --profile's measurement: the measured steps under torch.profiler, one host read each,
    and a Chrome trace that holds the steps' events."""
    import json

    import yaml

    from finetune.bench import measure

    data = yaml.safe_load(write_recipe(tmp_path, tiny_base, images, train={"max_steps": 4}).read_text())
    result = measure(data, warmup=1, steps=3, profile=str(tmp_path / "trace.json"))
    prof = result["profile"]
    assert prof["host_reads_per_step"] == 1.0, prof["read_sites"]
    assert prof["events_per_step"]["aten::item"] > 0  # torch.optim's CPU step counters: seen, not counted
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::addmm" for e in events)
    assert prof["sync_warnings_per_step"] is None  # no GPU here
