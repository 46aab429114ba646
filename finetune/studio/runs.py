"""The run queue: runs launched as separate processes, one at a time per device slot.

A studio run is a folder `<root>/.studio/runs/<id>/` holding `run.json` (its state), `recipe.yaml` (the
recipe exactly as launched, paths relative to the root) and `log.txt` (everything the processes print).
The training itself writes only to the recipe's `train.output_dir`. Starting, resuming and re-running
go through one lock, so two browser tabs cannot start the same run, or two runs into one folder, twice.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.export.io import write_text_atomic
from finetune.studio import procs
from finetune.studio.paths import confine
from finetune.studio.recipes import confine_recipe, to_yaml, validation_errors

ACTIVE = ("queued", "running", "stopping")


class Conflict(UserError):
    """The run is already queued or running, or its folder is taken (HTTP 409)."""


class RecipeInvalid(UserError):
    """The recipe does not validate; `errors` holds the messages by key (HTTP 422)."""

    def __init__(self, errors: list[dict[str, str]]):
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


@dataclass
class Run:
    id: str
    name: str
    output_dir: str  # relative to the root, as in the recipe
    accelerate_config: str = ""  # a file of recipes/accelerate/, or '' for one process
    status: str = "queued"  # queued, running, stopping, stopped, done, failed, interrupted
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    device: str | None = None
    launches: int = 0
    overrides: list[str] = field(default_factory=list)  # for the next launch (resume)
    stop_requested: bool = False
    parent: str | None = None  # the run this one re-runs with changes
    log_offset: int = 0  # where the latest launch's output starts in log.txt


class RunManager:
    def __init__(self, root: Path, recipes_dir: Path, devices: list[str | None] | None = None,
                 hold: bool = False):
        self.root, self.recipes_dir = root, recipes_dir
        self.hold = hold  # keep queued runs waiting (tests, or a studio opened only to look)
        self.home = root / ".studio" / "runs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.slots: dict[str | None, str | None] = {d: None for d in (devices or [None])}  # device -> run id
        self.lock = threading.RLock()
        self.runs: dict[str, Run] = {}
        self.queue: list[str] = []
        self.procs: dict[str, Any] = {}
        self._load()

    # ------------------------------------------------------------------------------------- storage
    def folder(self, run_id: str) -> Path:
        return self.home / run_id

    def _save(self, run: Run) -> None:
        write_text_atomic(self.folder(run.id) / "run.json", json.dumps(asdict(run), indent=1))

    def _load(self) -> None:
        for path in sorted(self.home.glob("*/run.json")):
            try:
                run = Run(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # not ours, or damaged: leave it alone
            self.runs[run.id] = run
            if run.status == "queued":
                self.queue.append(run.id)
            elif run.status in ("running", "stopping"):
                if run.pid and procs.alive(run.pid):  # still training from an earlier studio: watch it
                    threading.Thread(target=self._watch_pid, args=(run,), daemon=True).start()
                else:
                    self._ended(run, None)
        self._schedule()

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise KeyError(run_id)
        return run

    def list(self) -> list[Run]:
        return sorted(self.runs.values(), key=lambda r: r.created, reverse=True)

    def recipe_data(self, run_id: str) -> dict[str, Any]:
        import yaml

        return yaml.safe_load((self.folder(run_id) / "recipe.yaml").read_text())

    def output(self, run: Run) -> Path:
        return confine(self.root, run.output_dir, "train.output_dir")

    # --------------------------------------------------------------------------------------- create
    def create(self, data: dict[str, Any], name: str = "", accelerate_config: str = "",
               parent: str | None = None) -> Run:
        """Validate the recipe (the CLI's rules and the root's), then queue it as a new run."""
        _, path_errors = confine_recipe(data, self.root)
        errors = validation_errors(data) + path_errors
        if errors:
            raise RecipeInvalid(errors)
        self._check_config(accelerate_config)
        out = str((data.get("train") or {}).get("output_dir") or "output/run")
        key = confine(self.root, out, "train.output_dir")
        with self.lock:
            for other in self.runs.values():
                if self.output(other) == key:
                    what = "is queued" if other.status in ACTIVE else f"is {other.status}"
                    raise Conflict(f"train.output_dir '{out}' belongs to run {other.id}, which {what}; "
                                   "resume or re-run that one, or choose another train.output_dir")
            run_id = f"{self._next_number():04d}-{_slug(name or Path(out).name)}"
            run = Run(id=run_id, name=name or Path(out).name, output_dir=out,
                      accelerate_config=accelerate_config, parent=parent)
            self.folder(run_id).mkdir(parents=True)
            write_text_atomic(self.folder(run_id) / "recipe.yaml", to_yaml(data))
            self.runs[run_id] = run
            self.queue.append(run_id)
            self._save(run)
            self._schedule()
        return run

    def _next_number(self) -> int:
        taken = [int(p.name[:4]) for p in self.home.iterdir() if p.name[:4].isdigit()]
        return max(taken, default=0) + 1

    def _check_config(self, name: str) -> None:
        if name and not (self.recipes_dir / "accelerate" / name).is_file():
            raise UserError(f"accelerate config '{name}' is not one of recipes/accelerate/")

    # ------------------------------------------------------------------------------- resume / stop
    def resume(self, run_id: str, max_steps: int | None = None) -> Run:
        """Queue a stopped or failed run again from its newest checkpoint (optionally to a new max_steps)."""
        from finetune.studio.outputs import checkpoints

        with self.lock:
            run = self.get(run_id)
            if run.status in ACTIVE:
                raise Conflict(f"run {run_id} is already {run.status}; it cannot start twice")
            if not checkpoints(self.output(run)):
                raise Conflict(f"run {run_id} has no complete checkpoint to resume from; re-run it instead")
            run.overrides = ["train.resume=latest"]
            if max_steps is not None:
                if not isinstance(max_steps, int) or max_steps < 1:
                    raise UserError("max_steps: must be a whole number >= 1")
                run.overrides.append(f"train.max_steps={max_steps}")
            run.status, run.stop_requested, run.exit_code = "queued", False, None
            self.queue.append(run_id)
            self._save(run)
            self._schedule()
            return run

    def stop(self, run_id: str) -> Run:
        with self.lock:
            run = self.get(run_id)
            if run.status == "queued":
                self.queue.remove(run_id)
                run.status = "stopped" if run.launches else "cancelled"
            elif run.status in ("running", "stopping") and run.pid:
                run.stop_requested, run.status = True, "stopping"
                procs.request_stop(run.pid)
            else:
                raise Conflict(f"run {run_id} is {run.status}; there is nothing to stop")
            self._save(run)
            return run

    # ------------------------------------------------------------------------------------ scheduling
    def _schedule(self) -> None:
        """Start queued runs on free device slots (called with the lock held, or at start-up)."""
        with self.lock:
            for device, busy in self.slots.items():
                if busy is None and self.queue and not self.hold:
                    self._launch(self.runs[self.queue.pop(0)], device)

    def _launch(self, run: Run, device: str | None) -> None:
        folder = self.folder(run.id)
        config = self.recipes_dir / "accelerate" / run.accelerate_config if run.accelerate_config else None
        cmd = procs.launch_command(folder / "recipe.yaml", run.overrides, config)
        log = folder / "log.txt"
        run.log_offset = log.stat().st_size if log.is_file() else 0
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
        try:
            proc = procs.start(cmd, self.root, log, device)
        except OSError as e:
            with log.open("a") as f:
                f.write(f"error: could not start the run: {e}\n")
            run.status, run.ended = "failed", time.time()
            self._save(run)
            return
        run.status, run.pid, run.device, run.started, run.ended = "running", proc.pid, device, time.time(), None
        run.launches += 1
        self.slots[device] = run.id
        self.procs[run.id] = proc
        self._save(run)
        threading.Thread(target=self._wait, args=(run, proc), daemon=True).start()

    def _wait(self, run: Run, proc) -> None:
        code = proc.wait()
        with self.lock:
            self._ended(run, code)
            self._schedule()

    def _watch_pid(self, run: Run) -> None:
        while procs.alive(run.pid):
            time.sleep(1.0)
        with self.lock:
            self._ended(run, None)

    def _ended(self, run: Run, code: int | None) -> None:
        from finetune.studio.outputs import read_tail

        tail = read_tail(self.folder(run.id) / "log.txt", 16 * 1024, start=run.log_offset)  # this launch only
        run.exit_code, run.ended, run.pid = code, time.time(), None
        if re.search(r"stopped by SIG\w+ at step", tail):
            run.status = "stopped"
        elif code == 0 or (code is None and re.search(r"^done: \d+ steps", tail, re.M)):
            run.status = "done"
        else:
            run.status = "failed" if code is not None else "interrupted"
        self.procs.pop(run.id, None)
        for device, busy in self.slots.items():
            if busy == run.id:
                self.slots[device] = None
        self._save(run)

    def shutdown(self) -> None:
        """Ask every running run to checkpoint and stop (the studio is closing)."""
        with self.lock:
            for run in self.runs.values():
                if run.status in ("running", "stopping") and run.pid:
                    run.stop_requested, run.status = True, "stopping"
                    procs.request_stop(run.pid)
                    self._save(run)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "run"
