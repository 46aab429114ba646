"""Data-parallel training with 2 CPU processes under `accelerate launch`."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.helpers import DDP_CPU, LAYOUT_EXPORT, launch, layout_recipe, max_difference, run_trainer


@pytest.mark.parametrize("kind", ["plain", "prior", "ti"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_base, kind):
    """2 processes at batch 2 train what 1 process at batch 4 trains: plain LoRA, with prior preservation, and
    Textual Inversion whose empty captions get templates drawn per example."""
    recipe = layout_recipe(tmp_path, tiny_base, kind, checkpoint_every=2)
    two = launch(recipe, DDP_CPU, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes hold identical weights" in two.stderr + two.stdout
    # the one-process reference runs in this process (a launch of one process adds only start-up time)
    run_trainer(recipe, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=4")
    file = LAYOUT_EXPORT[kind]
    scale = max(float(v.abs().max()) for v in load_file(tmp_path / "one" / file).values())
    assert max_difference(tmp_path / "two" / file, tmp_path / "one" / file) < 1e-5 * max(1.0, scale)
    # only the main process wrote: one checkpoint folder per step, one grid folder, one export
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002"]
