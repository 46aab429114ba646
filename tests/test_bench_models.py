"""tools/bench.py's video rows (Wan 2.1 1.3B on a GPU, the tiny Wan on a CPU): the clips it trains on and the
bare denoiser floor it divides by, sized by the family's own latents."""

from __future__ import annotations

import pytest


@pytest.fixture
def bench_root(tmp_path, monkeypatch):
    import finetune.bench as bench

    monkeypatch.setattr(bench, "ROOT", tmp_path)  # the random bases and clips go under output/bench there
    return tmp_path


def test_video_rows_train_on_clips_of_the_models_frame_count(bench_root):
    from finetune.bench import VIDEO, base_recipe
    from finetune.data.scan import scan_data
    from finetune.recipe import validate

    recipe = validate(base_recipe("wan-tiny", 1, 1, "no", 4, "lora"))
    scan = scan_data(recipe.data, verbose=False)
    records = [r for s in scan.subsets for r in s.records]
    assert len(records) == 8 and {r.frames for r in records} == {VIDEO["wan-tiny"]}
    assert {r.size for r in records} == {(64, 64)}
    assert base_recipe("wan-1.3b", 1, 1, "bf16", 16, "lora", build=False)["data"]["video"]["frames"] == 81


def test_the_bare_floor_runs_on_a_video_base(bench_root):
    """The floor's latents are the family's own clip latents ([B, C, F', h, w] for Wan), not an image's."""
    from finetune.bench import bare_denoiser, base_recipe

    result = bare_denoiser(base_recipe("wan-tiny", 1, 1, "no", 4, "lora"), warmup=0, steps=1)
    assert "error" not in result and result["step_s"] > 0
