"""Starting and stopping a run's processes.

A run starts as `accelerate launch [--config_file C] finetune/run.py RECIPE [overrides]` in a new session
(its own process group). Stopping sends SIGTERM to the launcher's direct children: those are the trainer
processes (one, or one per rank under torchrun), which finish the step, checkpoint and exit; the launcher
then exits by itself. Signalling the whole group instead would also hit DataLoader workers, whose death
the trainer treats as a crash, and the torchrun agent, which would kill its ranks before they checkpoint.
Before the launcher has started a child there is nothing to checkpoint, and the whole group gets SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import finetune

RUN_PY = Path(finetune.__file__).resolve().parent / "run.py"
SINGLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_command(recipe: Path, overrides: list[str], accelerate_config: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(accelerate_config)] if accelerate_config else SINGLE
    return cmd + [str(RUN_PY), str(recipe), *overrides]


def start(cmd: list[str], cwd: Path, log: Path, device: str | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="1")  # tqdm: one log line a second at most
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc); [] where /proc is not available."""
    proc = Path("/proc")
    out = []
    for entry in proc.glob("[0-9]*/stat") if proc.is_dir() else []:
        try:
            stat = entry.read_text()
        except OSError:
            continue
        # 'pid (comm) state ppid ...': comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.parent.name))
    return out


def request_stop(pid: int) -> list[int]:
    """SIGTERM the trainer processes of a launcher (see the module doc); returns the pids signalled."""
    kids = children(pid)
    try:
        if kids:
            for k in kids:
                os.kill(k, signal.SIGTERM)
            return kids
        os.killpg(pid, signal.SIGTERM)  # pid leads its session and group (start_new_session)
        return [pid]
    except ProcessLookupError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():  # a zombie is dead for our purposes
        text = stat.read_text()
        return text[text.rfind(")") + 2:].split()[0] != "Z"
    return True
