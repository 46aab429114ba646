"""Every tool against every kind of bad input (issue #21): truncated, random-byte, NaN-holding, pickle and
wrong-family files, missing paths, and `--out` pointing at an input or at an existing file.

Each case must: exit non-zero, print exactly one line on stderr that names the culprit, print no traceback,
and leave every file in the work folder byte-identical (nothing overwritten, nothing half-written, no new
file). The tools run in this process through their `main(argv)` (the same `_common.run` wrapper the command
line uses), so a whole table costs one base load per case, not one interpreter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from finetune.export.lora import export_lora
from tests.helpers import adapted, make_ctx

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool(name: str):
    if str(TOOLS) not in sys.path:
        sys.path.append(str(TOOLS))
    spec = importlib.util.spec_from_file_location(f"finetune_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden temporaries included) and its hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def restore(root: Path, saved: dict[str, bytes]) -> None:
    """Put the work folder back as it was, so one failing case does not spoil the next."""
    import shutil

    for path in sorted(root.rglob("*"), reverse=True):
        rel = str(path.relative_to(root))
        if path.is_file() and rel not in saved:
            path.unlink()
        elif path.is_dir() and not any(k == rel or k.startswith(rel + "/") for k in saved) and rel != "empty":
            shutil.rmtree(path)
    for rel, data in saved.items():
        if (root / rel).read_bytes() != data:
            (root / rel).write_bytes(data)


@dataclass
class Outcome:
    code: int | None
    err: str
    crash: str = ""  # an exception that escaped the tool's one-line handling

    def problems(self, culprit: str, before: dict, after: dict) -> list[str]:
        bad = []
        if self.crash:
            bad.append(f"traceback: {self.crash}")
        if not self.code:
            bad.append(f"exit {self.code}")
        lines = [line for line in self.err.splitlines() if line.strip()]
        if len(lines) != 1:
            bad.append(f"{len(lines)} stderr lines")
        if "Traceback" in self.err:
            bad.append("traceback on stderr")
        if lines and culprit.lower() not in lines[0].lower():
            bad.append(f"line does not name {culprit!r}")
        if before != after:
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            bad.append(f"files changed: {changed}")
        return bad


def call(name: str, argv, capsys) -> Outcome:
    module = tool(name)
    capsys.readouterr()
    try:
        code = sys.modules["_common"].run(module.main, [str(a) for a in argv])
        crash = ""
    except SystemExit as e:  # argparse
        code, crash = e.code, ""
    except BaseException as e:  # noqa: BLE001 - what the sweep looks for
        code, crash = None, f"{type(e).__name__}: {str(e)[:200]} @ {traceback.extract_tb(e.__traceback__)[-1].name}"
    return Outcome(code, capsys.readouterr().err, crash)


# ------------------------------------------------------------------------------------------------ the inputs
@pytest.fixture(scope="module")
def box(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """A work folder of good and bad inputs; every case runs against it."""
    import shutil

    from PIL import Image
    from safetensors.torch import load_file, save_file

    from finetune.export.embeddings import save_embeddings

    root = tmp_path_factory.mktemp("box")
    comps, method = adapted(tiny_base, rank=2, alpha=2.0, seed=3, targets=["to_q", "to_v"], te=False)
    export_lora(comps, method, root / "good", make_ctx("good", formats=("kohya",)))
    good = root / "good" / "good.safetensors"
    other = root / "other.safetensors"
    other.write_bytes(good.read_bytes())
    save_embeddings({"text_encoder": torch.randn(1, 32)}, "sks", root / "emb", make_ctx("emb"))
    emb = next((root / "emb").glob("*.safetensors"))
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "header.safetensors").write_bytes(data[:8] + data[8:20])  # header cut short
    (root / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes())
    tensors = load_file(good)
    first = sorted(k for k in tensors if "lora_up" in k)[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("nan")
    save_file(tensors, root / "nan.safetensors")
    emb_t = load_file(emb)
    save_file({k: v.clone().fill_(float("inf")) for k, v in emb_t.items()}, root / "nan_emb.safetensors")
    # a FLUX-shaped kohya LoRA: a well-formed file for another family
    save_file({"lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": torch.zeros(2, 3072),
               "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": torch.zeros(3072, 2)},
              root / "flux.safetensors")
    torch.save({"w": torch.zeros(2)}, root / "weights.ckpt")
    (root / "broken.ckpt").write_bytes(b"not a pickle at all")
    Image.new("RGB", (64, 64), "red").save(root / "photo.png")
    (root / "photo_cut.png").write_bytes((root / "photo.png").read_bytes()[:40])
    (root / "existing.safetensors").write_bytes(b"someone else's file")
    (root / "existing.png").write_bytes(b"someone else's image")
    (root / "scored").mkdir()
    (root / "scored" / "results.json").write_text("{}")  # an earlier score_toy_edit run's
    shutil.copytree(tiny_base, root / "broken_base")
    (root / "broken_base" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipel')
    (root / "base.ckpt").write_bytes(b"PK\x03\x04 not really a torch zip")
    (root / "base_cut.safetensors").write_bytes(data[:100])
    (root / "empty").mkdir()
    (root / "refs").mkdir()
    Image.new("RGB", (64, 64), "blue").save(root / "refs" / "0.png")
    (root / "a_file").write_text("not a folder")
    return {"root": root, "good": good, "other": other, "emb": emb}


def p(box, name: str) -> Path:
    return box["root"] / name


LORA_INPUTS = [("truncated.safetensors", "truncated"), ("header.safetensors", "header"),
               ("random.safetensors", "random"), ("nan.safetensors", "nan"), ("flux.safetensors", "family"),
               ("weights.ckpt", "pickle"), ("broken.ckpt", "pickle-broken"), ("missing.safetensors", "missing")]


def lora_cases(box, bad: Path, base) -> list[tuple[str, list]]:
    out = p(box, "new.safetensors")
    cases = [
        ("convert", ["lora", bad, "--to", "diffusers", "--out", p(box, "new_dir")]),
        ("resize", [bad, "--rank", 1, "--out", out]),
        ("merge", ["combine", "--lora", box["good"], "--lora", bad, "--out", out]),
        ("merge", ["fuse", "--base", base, "--lora", bad, "--single-file", out]),
        ("inspect_file", [bad]),
        ("generate", ["a circle", "--base", base, "--lora", bad, "--steps", 1, "--batch", 1, "--out",
                      p(box, "new.png")]),
    ]
    if "broken" in bad.name:  # a pickle the user allowed, that is not a valid torch file
        cases = [(n, [*a, "--allow-pickle"]) for n, a in cases if n in ("convert", "merge", "inspect_file")]
    if "flux" in bad.name:  # a well-formed file: describing and converting it are fine
        cases = [c for c in cases if c[0] in ("merge", "generate")]
    return cases


def out_cases(box, base) -> list[tuple[str, str, list]]:
    """(culprit, tool, argv): outputs that would replace an input or an unrelated file."""
    good, other, emb = box["good"], box["other"], box["emb"]
    existing, photo = p(box, "existing.safetensors"), p(box, "photo.png")
    gen = ["a circle", "--base", base, "--steps", 1, "--batch", 1]
    return [
        (good.name, "convert", ["lora", good, "--to", "kohya", "--out", good]),
        (existing.name, "convert", ["lora", good, "--to", "kohya", "--out", existing]),
        (emb.name, "convert", ["embedding", emb, "--to", "a1111", "--out", emb]),
        (existing.name, "convert", ["embedding", emb, "--to", "a1111", "--out", existing]),
        (good.name, "resize", [good, "--rank", 1, "--out", good]),
        (existing.name, "resize", [good, "--rank", 1, "--out", existing]),
        (other.name, "merge", ["combine", "--lora", good, "--lora", other, "--out", other]),
        (existing.name, "merge", ["combine", "--lora", good, "--lora", other, "--out", existing]),
        (good.name, "merge", ["fuse", "--base", base, "--lora", good, "--single-file", good, "--overwrite"]),
        (existing.name, "merge", ["fuse", "--base", base, "--lora", good, "--single-file", existing]),
        (photo.name, "generate", [*gen, "--init-image", photo, "--out", photo]),
        ("existing.png", "generate", [*gen, "--out", p(box, "existing.png")]),
    ]


def value_cases(box, base) -> list[tuple[str, str, list]]:
    """(culprit, tool, argv): bad values and bad non-weight inputs."""
    gen = ["a circle", "--base", base, "--batch", 1, "--out", p(box, "new.png")]
    return [
        ("--steps", "generate", [*gen, "--steps", 0]),
        ("--width", "generate", [*gen, "--steps", 1, "--width", 100]),
        ("--height", "generate", [*gen, "--steps", 1, "--height", -8]),
        ("--device", "generate", [*gen, "--steps", 1, "--device", "nonsense"]),
        ("--device", "generate", [*gen, "--steps", 1, "--device", "cuda" if not torch.cuda.is_available() else "mps"]),
        ("sdxl", "generate", [*gen, "--steps", 1, "--family", "sdxl"]),
        ("sdxl", "merge", ["fuse", "--base", base, "--family", "sdxl", "--lora", box["good"], "--single-file",
                           p(box, "new.safetensors")]),
        ("--guidance", "generate", [*gen, "--steps", 1, "--guidance", "nan"]),
        ("--strength", "generate", [*gen, "--steps", 1, "--init-image", p(box, "photo.png"), "--strength", 2]),
        ("photo_cut.png", "generate", [*gen, "--steps", 2, "--init-image", p(box, "photo_cut.png")]),
        ("--steps", "generate", [*gen, "--steps", 1, "--init-image", p(box, "photo.png"), "--strength", 0.5]),
        ("--out", "generate", [*gen, "--steps", 1, "--out", p(box, "grid.nope")]),
        ("nan_emb.safetensors", "generate", [*gen, "--steps", 1, "--embedding", p(box, "nan_emb.safetensors")]),
        ("nan_emb.safetensors", "convert", ["embedding", p(box, "nan_emb.safetensors"), "--to", "a1111", "--out",
                                            p(box, "new.safetensors")]),
        ("truncated.safetensors", "convert", ["embedding", p(box, "truncated.safetensors"), "--to", "a1111",
                                              "--out", p(box, "new.safetensors")]),
        ("--rank", "resize", [box["good"], "--rank", 0, "--out", p(box, "new.safetensors")]),
        ("--energy", "resize", [box["good"], "--energy", "nan", "--out", p(box, "new.safetensors")]),
        ("--energy", "merge", ["combine", "--lora", box["good"], "--energy", 1.5, "--out", p(box, "new.safetensors")]),
        ("good.safetensors", "merge", ["combine", "--lora", f"{box['good']}:nan", "--out", p(box, "new.safetensors")]),
        ("missing_base", "merge", ["fuse", "--base", p(box, "missing_base"), "--lora", box["good"], "--single-file",
                                   p(box, "new.safetensors")]),
        ("a_file", "merge", ["fuse", "--base", p(box, "a_file"), "--lora", box["good"], "--single-file",
                             p(box, "new.safetensors")]),
        ("model_index.json", "merge", ["fuse", "--base", p(box, "broken_base"), "--lora", box["good"],
                                       "--single-file", p(box, "new.safetensors")]),
        ("base.ckpt", "merge", ["fuse", "--base", p(box, "base.ckpt"), "--allow-pickle", "--config", base,
                                "--lora", box["good"], "--single-file", p(box, "new.safetensors")]),
        ("base_cut.safetensors", "generate", ["a circle", "--base", p(box, "base_cut.safetensors"), "--config",
                                              base, "--steps", 1, "--out", p(box, "new.png")]),
        ("missing_folder", "dataset", [p(box, "missing_folder")]),
        ("a_file", "dataset", [p(box, "a_file")]),
        ("empty", "dataset", [p(box, "empty")]),
        ("missing_folder", "caption", [p(box, "missing_folder"), "--dry-run"]),
        *evaluate_cases(box, base),
        ("a_file", "caption", [p(box, "a_file"), "--dry-run"]),
        *score_toy_edit_cases(box),
        *score_toy_control_cases(box),
    ]


def score_toy_edit_cases(box) -> list[tuple[str, str, list]]:
    """tools/score_toy_edit.py: values and the run folder checked before a model loads; a bad LoRA named."""
    out = ["--out", p(box, "scores")]
    return [
        ("missing_folder", "score_toy_edit", [p(box, "missing_folder"), *out]),
        ("--instructions", "score_toy_edit", [box["good"], "--instructions", "make it sparkle", *out]),
        ("--n", "score_toy_edit", [box["good"], "--n", 0, *out]),
        ("--guidance", "score_toy_edit", [box["good"], "--guidance", "nan", *out]),
        ("truncated.safetensors", "score_toy_edit", [p(box, "truncated.safetensors"), "--n", 1, "--steps", 1, *out]),
        ("results.json", "score_toy_edit", [box["good"], "--out", p(box, "scored")]),
    ]


def score_toy_control_cases(box) -> list[tuple[str, str, list]]:
    """tools/score_toy_control.py: values and the run folder checked before a model loads; a bad LoRA named;
    --guidance refused for a FLUX toy run (sampled without CFG)."""
    out = ["--out", p(box, "scores")]
    return [
        ("missing_folder", "score_toy_control", [p(box, "missing_folder"), *out]),
        ("--n", "score_toy_control", [box["good"], "--n", 0, *out]),
        ("--steps", "score_toy_control", [box["good"], "--steps", 0, *out]),
        ("--conditioning-scale", "score_toy_control", [box["good"], "--conditioning-scale", "nan", *out]),
        ("--guidance", "score_toy_control", [box["good"], "--guidance", 3, *out]),  # a LoRA: the FLUX toy, no CFG
        ("truncated.safetensors", "score_toy_control", [p(box, "truncated.safetensors"), "--n", 1, "--steps", 1,
                                                        *out]),
        ("results.json", "score_toy_control", [box["good"], "--out", p(box, "scored")]),
    ]


def evaluate_cases(box, base) -> list[tuple[str, str, list]]:
    """tools/evaluate.py: every value checked before a model loads; adapters and folders named."""
    ev = ["--base", base, "--references", box["root"] / "refs", "--prompts", "a circle", "--seeds", 0,
          "--out", p(box, "eval_out")]
    return [
        ("--steps", "evaluate", [*ev, "--with-base", "--steps", 0]),
        ("--width", "evaluate", [*ev, "--with-base", "--width", 100]),
        ("--seeds", "evaluate", [*ev, "--with-base", "--seeds", -1]),
        ("--guidance", "evaluate", [*ev, "--with-base", "--guidance", "nan"]),
        ("truncated.safetensors", "evaluate", [*ev, "--lora", p(box, "truncated.safetensors")]),
        ("missing.safetensors", "evaluate", [*ev, "--lora", p(box, "missing.safetensors")]),
        ("missing_folder", "evaluate", [*ev, "--images", p(box, "missing_folder")]),
        ("missing_folder", "evaluate", [*ev[:2], "--references", p(box, "missing_folder"), *ev[4:], "--with-base"]),
        ("--class-word", "evaluate", [*ev[:5], "dreambench_toy", *ev[6:], "--with-base"]),
    ]


def all_cases(box, base) -> list[tuple[str, str, list]]:
    cases = []
    for name, _ in LORA_INPUTS:
        culprit = name
        for tool_name, argv in lora_cases(box, p(box, name), base):
            cases.append((culprit, tool_name, argv))
    return cases + out_cases(box, base) + value_cases(box, base)


TOOL_NAMES = ["convert", "resize", "merge", "inspect_file", "generate", "dataset", "caption", "evaluate",
              "score_toy_edit", "score_toy_control"]


@pytest.mark.parametrize("tool_name", TOOL_NAMES)
def test_every_tool_refuses_every_bad_input_in_one_line(box, tiny_base, capsys, tool_name):
    cases = [c for c in all_cases(box, tiny_base) if c[1] == tool_name]
    assert cases
    saved = {str(q.relative_to(box["root"])): q.read_bytes() for q in box["root"].rglob("*") if q.is_file()}
    before, failures = snapshot(box["root"]), []
    for culprit, _, argv in cases:
        outcome = call(tool_name, argv, capsys)
        bad = outcome.problems(culprit, before, snapshot(box["root"]))
        restore(box["root"], saved)
        if bad:
            failures.append(f"{tool_name} {' '.join(str(a).replace(str(box['root']), '~') for a in argv)}: "
                            f"{'; '.join(bad)} | {outcome.err.strip()[:300]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def test_the_table_covers_every_tool_that_reads_user_files(box, tiny_base):
    """A new tool that reads models, adapters or folders gets rows here (bench, toy builders: no user input)."""
    covered = {c[1] for c in all_cases(box, tiny_base)}
    shipped = {p.stem for p in TOOLS.glob("*.py")} - {"_common", "bench", "bench_cache", "bench_caption",
                                                       "bench_startup", "make_toy_model", "preservation_cost",
                                                       "toy_data"}
    assert shipped == covered == set(TOOL_NAMES)


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EACCES"])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(box, capsys, monkeypatch, errno_name):
    """Disk full (or no permission) half-way through writing an output that replaces an existing one
    (--overwrite): one line naming the file, the old bytes kept, no temporary file left behind."""
    import errno
    import os

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    target = p(box, "existing.safetensors")
    before = snapshot(box["root"])
    outcome = call("convert", ["lora", box["good"], "--to", "kohya", "--out", target, "--overwrite"], capsys)
    assert not outcome.problems("existing.safetensors", before, snapshot(box["root"])), outcome
    assert f"{target}:" in outcome.err and ".tmp" not in outcome.err  # the user's file, not our temporary one
