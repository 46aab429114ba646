"""The run queue: runs launched as separate processes, one at a time per device slot.

A studio run is a folder `<root>/.studio/runs/<id>/` holding `run.json` (its state), `recipe.yaml` (the
recipe exactly as launched: every path confined to the root and written absolute), `log.txt` (everything the
processes print) and `work/` (the launch's working folder). No request can reach that folder, and every
launch checks recipe.yaml against the SHA-256 run.json recorded when the studio wrote it, so a run or a resume
launches the recipe the studio validated and nothing else. The training itself writes only to the recipe's
`train.output_dir`. Starting, resuming and re-running go through one lock, so two browser tabs cannot start
the same run, or two runs into one folder, twice.
"""

from __future__ import annotations

import hashlib
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
from finetune.studio.paths import confine, relative
from finetune.studio.recipes import accelerate_config, check_recipe, read_launched, to_yaml

MAX_NAME_CHARS = 200

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
    output_dir: str  # relative to the root ('.' for the root itself)
    accelerate_config: str = ""  # a file name of recipes/accelerate/, or '' for one process
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
    recipe_sha256: str = ""  # of recipe.yaml as the studio wrote it; checked before every launch


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
        """The run's recipe as the form shows it (paths relative to the root), read with the CLI's limits."""
        self.get(run_id)
        return read_launched(self.folder(run_id) / "recipe.yaml", self.root)

    def output(self, run: Run) -> Path:
        return confine(self.root, run.output_dir, "train.output_dir")

    # --------------------------------------------------------------------------------------- create
    def create(self, data: dict[str, Any], name: Any = "", config: Any = "", parent: Any = None) -> Run:
        """Validate the recipe (the CLI's rules and the root's), then queue it as a new run."""
        checked = check_recipe(data, self.root)
        if checked.errors:
            raise RecipeInvalid(checked.errors)
        accelerate_config(self.recipes_dir, config)
        name = _plain_text(name, "name")
        if parent is not None and (not isinstance(parent, str) or parent not in self.runs):
            raise UserError("parent: not a run of this studio; leave it out or name the run this one re-runs")
        key = Path(checked.launch["train"]["output_dir"])  # absolute and confined (check_recipe)
        out = relative(self.root, key) or "."
        with self.lock:
            for other in self.runs.values():
                if self.output(other) == key:
                    what = "is queued" if other.status in ACTIVE else f"is {other.status}"
                    raise Conflict(f"train.output_dir '{out}' belongs to run {other.id}, which {what}; "
                                   "resume or re-run that one, or choose another train.output_dir")
            run_id = f"{self._next_number():04d}-{_slug(name or key.name)}"
            text = to_yaml(checked.launch)
            run = Run(id=run_id, name=name or key.name, output_dir=out, accelerate_config=config or "",
                      parent=parent, recipe_sha256=_sha256(text.encode("utf-8")))
            self.folder(run_id).mkdir(parents=True)
            write_text_atomic(self.folder(run_id) / "recipe.yaml", text)
            self.runs[run_id] = run
            self.queue.append(run_id)
            self._save(run)
            self._schedule()
        return run

    def _next_number(self) -> int:
        taken = [int(p.name[:4]) for p in self.home.iterdir() if p.name[:4].isdigit()]
        return max(taken, default=0) + 1

    # ------------------------------------------------------------------------------- resume / stop
    def resume(self, run_id: str, max_steps: Any = None) -> Run:
        """Queue a stopped or failed run again from its newest checkpoint (optionally to a new max_steps)."""
        from finetune.studio.outputs import checkpoints

        if max_steps is not None and (type(max_steps) is not int or max_steps < 1):
            raise UserError("max_steps: must be a whole number >= 1, or null to keep the run's")
        with self.lock:
            run = self.get(run_id)
            if run.status in ACTIVE:
                raise Conflict(f"run {run_id} is already {run.status}; it cannot start twice")
            if not checkpoints(self.output(run)):
                raise Conflict(f"run {run_id} has no complete checkpoint to resume from; re-run it instead")
            run.overrides = ["train.resume=latest"]
            if max_steps is not None:
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
            for device in self.slots:
                while self.slots[device] is None and self.queue and not self.hold:  # a refused launch frees it
                    self._launch(self.runs[self.queue.pop(0)], device)

    def _launch(self, run: Run, device: str | None) -> None:
        folder = self.folder(run.id)
        log = folder / "log.txt"
        run.log_offset = log.stat().st_size if log.is_file() else 0
        try:
            self._verify(run)
            cmd = procs.launch_command(folder / "recipe.yaml", run.overrides,
                                       accelerate_config(self.recipes_dir, run.accelerate_config))
            with log.open("a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
            proc = procs.start(cmd, procs.work_dir(folder), log, device)
        except (OSError, UserError) as e:
            with log.open("a") as f:
                f.write(f"error: the run was not started: {e}\n")
            run.status, run.ended = "failed", time.time()
            self._save(run)
            return
        run.status, run.pid, run.device, run.started, run.ended = "running", proc.pid, device, time.time(), None
        run.launches += 1
        self.slots[device] = run.id
        self.procs[run.id] = proc
        self._save(run)
        threading.Thread(target=self._wait, args=(run, proc), daemon=True).start()

    def _verify(self, run: Run) -> None:
        """recipe.yaml must be the file the studio wrote for this run (its hash in run.json), byte for byte."""
        try:
            data = (self.folder(run.id) / "recipe.yaml").read_bytes()
        except OSError:
            data = b""
        if not run.recipe_sha256 or _sha256(data) != run.recipe_sha256:
            raise UserError(f"recipe.yaml of run {run.id} is not the one the studio wrote for it (changed, missing, "
                            "or from an older studio without its hash); nothing was launched: re-run it instead")

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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain_text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS or "\n" in value or "\x00" in value:
        raise UserError(f"{key}: a line of text of at most {MAX_NAME_CHARS} characters")
    return value.strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "run"
