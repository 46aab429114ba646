"""A base is resolved once per run, into one value that everything takes (finetune/models/base.py).

The family rules of a recipe run from that value: while the recipe validates for a local base, and once the
base has loaded for a hub id that was not in the local cache then (the value completes itself; nothing is
validated twice). The hub is simulated offline: a tiny model written into a temporary HF_HOME's cache after
the recipe has validated, as a download would, in a fresh process so huggingface_hub reads that HF_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_trainer, write_recipe

ROOT = Path(__file__).resolve().parents[1]
REPO = "toy-org/tiny-sd"  # the hub id the simulated cache holds


def counted(monkeypatch) -> tuple[list[str], list[str]]:
    """Count calls of the resolver and of the family rules (with the family's name) from here on."""
    import finetune.models.base as base_module
    import finetune.recipe as recipe_module

    resolved: list[str] = []
    checked: list[str] = []
    resolve, check = base_module.resolve_base, recipe_module.check_family

    def counting_resolve(name, *args, **kwargs):
        resolved.append(name)
        return resolve(name, *args, **kwargs)

    def counting_check(recipe, family):
        checked.append(family.name)
        assert family is recipe.base.family  # the rules read the one value the recipe holds
        return check(recipe, family)

    monkeypatch.setattr(base_module, "resolve_base", counting_resolve)
    monkeypatch.setattr(recipe_module, "check_family", counting_check)
    return resolved, checked


def test_a_toy_run_resolves_its_base_once(tmp_path, monkeypatch):
    resolved, checked = counted(monkeypatch)
    recipe = write_recipe(tmp_path, "toy", ROOT / "finetune" / "toy" / "base", train={"max_steps": 2},
                          data={"sources": [{"type": "toy", "subject": "world", "count": 4}]})
    t = run_trainer(recipe)
    assert resolved == ["toy"]
    assert checked == ["sd1"]  # at recipe time: a toy base's family is in its config files
    assert t.comps.base is t.recipe.base and t.comps.base.form == "toy"
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_a_local_base_runs_the_family_rules_while_the_recipe_validates(tmp_path, tiny_base, images, monkeypatch):
    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe

    resolved, checked = counted(monkeypatch)
    with pytest.raises(RecipeError, match="'bfl' is not a LoRA layout of the sd1 family"):
        load_recipe(write_recipe(tmp_path, tiny_base, images, export={"formats": ["bfl"]}))
    assert resolved == [str(tiny_base)] and checked == ["sd1"]


def test_every_form_resolves_without_loading(tmp_path, tiny_base):
    """toy, folder, single file, hub id: the form, where it opens and the family, from files alone; what cannot
    load still resolves, its reason kept for the loader (a recipe for another machine still prints)."""
    import torch
    from safetensors.torch import save_file

    from finetune.errors import ModelError
    from finetune.models.base import resolve_base

    toy = resolve_base("toy-flux")
    assert (toy.form, toy.family.name, toy.folder) == ("toy", "flux", ROOT / "finetune" / "toy" / "base_flux")
    folder = resolve_base(str(tiny_base), family="sd2")
    assert (folder.form, folder.family.name, folder.forced, "unet" in folder.index) == ("folder", "sd2", True, True)
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, tmp_path / "xl.safetensors")
    single = resolve_base(str(tmp_path / "xl.safetensors"), config=str(tiny_base))
    assert (single.form, single.family.name, single.config) == ("file", "sdxl", str(tiny_base))
    torch.save({"w": torch.zeros(1)}, tmp_path / "old.ckpt")
    pickle = resolve_base(str(tmp_path / "old.ckpt"), allow_pickle=True)
    assert (pickle.form, pickle.family, pickle.problem) == ("file", None, None)  # its keys: only once allowed
    hub = resolve_base("nobody/not-cached", revision="v1")
    assert (hub.form, hub.location, hub.family, hub.folder, hub.revision) == ("hub", "nobody/not-cached", None,
                                                                               None, "v1")
    missing = resolve_base(str(tmp_path / "nowhere"))
    assert missing.problem.endswith("no such folder or file; check the path")
    with pytest.raises(ModelError, match="no such folder"):
        missing.check()
    assert "model.config" in resolve_base(str(tmp_path / "xl.safetensors"), config=str(tmp_path / "x")).problem


def test_the_estimate_takes_the_resolved_base():
    """`finetune estimate` builds the base the recipe resolved: the FLUX toy base's own folder (the estimate
    used to look for the SD toy by name only, and sent 'toy-flux' to the hub cache)."""
    from finetune.memory.estimate import estimate
    from finetune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "toy" / "flux_lora.yaml")
    est = estimate(recipe, "cpu", options=False)
    assert recipe.base.form == "toy" and est.bytes_of("denoiser") > 0 and est.training > est.bytes_of("denoiser")


def _cache(hf_home: Path, model: Path) -> None:
    """`model` as the hub cache holds a downloaded repository: a snapshot named by its commit, refs/main."""
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def hub_run(recipe_path: str, model: str, report: str) -> None:
    """(run in a fresh process whose HF_HOME is empty) validate the recipe, 'download' the base, train."""
    from _pytest.monkeypatch import MonkeyPatch

    from finetune.errors import RecipeError
    from finetune.recipe import load_recipe
    from finetune.train.setup import check_output_dir, make_accelerator
    from finetune.train.trainer import Trainer

    resolved, checked = counted(MonkeyPatch())
    recipe = load_recipe(recipe_path)
    out = {"known_at_recipe_time": recipe.base.family is not None}
    _cache(Path(os.environ["HF_HOME"]), Path(model))
    try:
        check_output_dir(recipe)
        t = Trainer(recipe, make_accelerator(recipe))
        t.run()
        out |= {"family": t.comps.base.family.name, "same_value": t.comps.base is recipe.base,
                "folder_in_cache": str(recipe.base.folder).startswith(os.environ["HF_HOME"])}
    except RecipeError as e:
        out["error"] = str(e)
    Path(report).write_text(json.dumps(out | {"resolved": resolved, "checked": checked}))


def in_a_fresh_cache(tmp_path: Path, recipe: Path, model: Path) -> dict:
    hf_home, report = tmp_path / "hf", tmp_path / "report.json"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = f"from tests.test_base import hub_run; hub_run({str(recipe)!r}, {str(model)!r}, {str(report)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def test_a_hub_id_cached_only_after_download_runs_the_family_rules_from_the_completed_value(
        tmp_path, tiny_base, images):
    (tmp_path / "good").mkdir(), (tmp_path / "bad").mkdir()
    good = in_a_fresh_cache(tmp_path / "good", write_recipe(tmp_path / "good", REPO, images), tiny_base)
    assert good == {"known_at_recipe_time": False, "family": "sd1", "same_value": True, "folder_in_cache": True,
                    "resolved": [REPO], "checked": ["sd1"]}
    # a rule that needs the family ('bfl' is FLUX's layout) waits at recipe time, and refuses once it shows
    bad = in_a_fresh_cache(tmp_path / "bad", write_recipe(tmp_path / "bad", REPO, images,
                                                          export={"formats": ["bfl"]}), tiny_base)
    assert "'bfl' is not a LoRA layout of the sd1 family" in bad.pop("error")
    assert bad == {"known_at_recipe_time": False, "resolved": [REPO], "checked": ["sd1"]}
