"""Short side jobs the pages start (the auto-caption button): a subprocess, its log, its exit code."""

from __future__ import annotations

import itertools
import subprocess
import threading
from pathlib import Path

from finetune.studio.outputs import log_lines, read_tail
from finetune.studio.paths import short


class Jobs:
    def __init__(self, home: Path, root: Path):
        self.home, self.root = home, root
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self.counter = itertools.count(1)

    def start(self, kind: str, cmd: list[str], cwd: Path) -> dict:
        """Start `cmd` in `cwd` (a working folder of the studio's, see procs.work_dir) unless one of its kind runs."""
        with self.lock:
            if any(j["kind"] == kind and j["proc"].poll() is None for j in self.jobs.values()):
                raise _busy(kind)
            job_id = f"{kind}-{next(self.counter)}"
            self.home.mkdir(parents=True, exist_ok=True)
            log = self.home / f"{job_id}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            self.jobs[job_id] = {"kind": kind, "proc": proc, "log": log}
        return self.status(job_id)

    def status(self, job_id: str) -> dict:
        job = self.jobs[job_id]
        code = job["proc"].poll()
        return {"id": job_id, "kind": job["kind"], "running": code is None, "exit_code": code,
                "log": [short(self.root, line) for line in log_lines(read_tail(job["log"]), 20)]}


def _busy(kind: str):
    from finetune.studio.runs import Conflict

    return Conflict(f"a {kind} job is already running; wait for it to finish")
