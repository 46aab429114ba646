"""A newcomer's first hour, scripted (issue 34): the README's "Your own pictures" commands, as written there, on a
generated folder of 13 mixed pictures with one corrupt file. Training stops with SIGTERM and goes on with the
command it prints. Every step exits 0 (or, where one line is the documented answer, with that one line), and
every step that works for a while shows progress."""

from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, own_pictures

PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|^\[\d+/\d+\]", re.M)  # a tqdm bar, or our "[i/n]" lines
QUICK_CPU_S = 5.0  # a step that works less than this needs no progress (a header read, a recipe check)


def readme_commands() -> list[list[str]]:
    """The README's own-pictures block, one argv per command (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Your own pictures, offline, in minutes")[1].split("```bash")[1].split("```")[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


def localise(argv: list[str]) -> list[str]:
    """Run from a folder of one's own: `python` is this interpreter, recipes/ and tools/ are the checkout's."""
    out = [sys.executable if argv[0] == "python" else argv[0]]
    for a in argv[1:]:
        out.append(str(ROOT / a) if a.startswith(("recipes/", "tools/")) else a)
    return out


class Hour:
    def __init__(self, cwd: Path):
        self.cwd, self.log = cwd, []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    def _cpu(self) -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def run(self, argv: list[str], *extra: str) -> subprocess.CompletedProcess:
        cpu, start = self._cpu(), time.perf_counter()
        done = subprocess.run([*localise(argv), *extra], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=1800)
        self.note(argv, done.returncode, done.stdout + done.stderr, time.perf_counter() - start, self._cpu() - cpu)
        return done

    def note(self, argv, code: int, output: str, wall: float, cpu: float) -> None:
        self.log.append((" ".join(argv[:3]), code, wall, cpu, bool(PROGRESS.search(output))))
        assert code == 0, f"{' '.join(argv)} exited {code}:\n{output[-3000:]}"

    def train_until_stopped(self, argv: list[str], *extra: str, after_steps: int) -> str:
        """Start a training, SIGTERM it once `after_steps` steps are logged; its stdout."""
        cpu, start = self._cpu(), time.perf_counter()
        proc = subprocess.Popen([*localise(argv), *extra], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        loss = self.cwd / "output" / "my-pictures" / "logs" / "loss.csv"
        while not (loss.is_file() and len(loss.read_text().splitlines()) > after_steps):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=600)
        self.note(argv, proc.returncode, out + err, time.perf_counter() - start, self._cpu() - cpu)
        return out


@pytest.mark.slow
def test_a_newcomers_first_hour(tmp_path):
    own_pictures(tmp_path / "my_pictures")
    commands = readme_commands()
    step = {name: next(c for c in commands if pick(c)) for name, pick in {
        "dataset": lambda c: c[1] == "tools/dataset.py",
        "caption": lambda c: c[1] == "tools/caption.py",
        "check": lambda c: "--check" in c,
        "train": lambda c: c[-1].startswith("data.sources.0.path=") and "--check" not in c,
        "resume": lambda c: "--resume" in c,
        "generate": lambda c: c[1] == "tools/generate.py",
        "inspect": lambda c: c[1] == "tools/inspect_file.py",
        "merge": lambda c: c[1] == "tools/merge.py",
        "evaluate": lambda c: c[1] == "tools/evaluate.py",
    }.items()}
    assert len(step) == len(commands)  # the test drives every documented command, each once
    hour = Hour(tmp_path)

    report = hour.run(step["dataset"]).stdout
    assert "corrupt.jpg" in report and "photo_00_copy.jpg: same bytes as photo_00.jpg" in report
    hour.run(step["caption"])
    captions = sorted((tmp_path / "my_pictures").glob("*.txt"))
    assert len(captions) == 12 and all("sks" in p.read_text() for p in captions)  # all but the corrupt file
    check = hour.run(step["check"]).stdout
    assert "11 images x 1 repeats" in check and "2 file(s) skipped" in check and "metric references" in check

    stopped = hour.train_until_stopped(step["train"], "train.max_steps=40", "validation.every=20", after_steps=15)
    hint = re.search(r"^resume with: (.+)$", stopped, re.M).group(1)
    assert shlex.split(hint) == step["resume"]  # what the run prints is what the README says
    hour.run(shlex.split(hint))
    run = tmp_path / "output" / "my-pictures"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "samples" / "metrics.json").is_file()
    assert (run / "logs" / "loss.csv").read_text().count("\n") == 41  # header + 40 steps, none twice

    hour.run(step["generate"], "--steps", "5")
    assert list((tmp_path / "output" / "generated").glob("my-pictures-000.png"))
    info = hour.run(step["inspect"]).stdout
    assert "trigger_words: ['sks']" in info and "format: diffusers lora" in info
    hour.run(step["merge"])
    assert (tmp_path / "output" / "my-pictures-fused.safetensors").is_file()
    hour.run(step["evaluate"], "--steps", "5", "--seeds", "0", "1")
    assert (run / "evaluation" / "results.json").is_file()

    for name, code, wall, cpu, progress in hour.log:
        print(f"{name:60s} exit {code}  {wall:6.1f} s  {cpu:6.1f} s CPU  progress {progress}")
        assert progress or cpu < QUICK_CPU_S, f"{name}: {cpu:.1f} s of work and no progress shown"
