"""Starting and stopping a run's processes.

A run starts as `accelerate launch [--config_file C] finetune/run.py RECIPE [overrides]` in a new session
(its own process group), in a working folder the studio owns (`.studio/runs/<id>/work`, which no request can
reach) and in Python's safe-path mode (`-P`, and PYTHONSAFEPATH=1 for every process the launcher starts): no
folder a user can write through the studio is ever on a launched process's import path, so a `yaml.py` or
`torch.py` in the data root is never imported. The recipe it launches names its paths absolute (confined to
the root when the studio wrote it), so it means the same from that folder. Stopping sends SIGTERM to the launcher's direct children: those are the trainer
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


def python() -> list[str]:
    """How the studio starts Python: in safe-path mode, so neither the working folder (`-m`, `-c`) nor a
    script's own folder is put first on sys.path (Python 3.11+; on 3.10 the studio's own working folder is
    what keeps the data root off the path)."""
    return [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def safe_env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: safe-path mode for every Python it starts in turn (accelerate's
    workers, DataLoader workers), output unbuffered for the log."""
    return dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1", **extra)


def work_dir(folder: Path) -> Path:
    """`folder/work`, an empty folder the studio owns, for a launched process to start in (anything a library
    writes to its working folder lands there, and nothing there is importable)."""
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    return work


def launch_command(recipe: Path, overrides: list[str], accelerate_config: Path | None) -> list[str]:
    cmd = [*python(), "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(accelerate_config)] if accelerate_config else SINGLE
    return cmd + [str(RUN_PY), str(recipe), *overrides]


def start(cmd: list[str], cwd: Path, log: Path, device: str | None) -> subprocess.Popen:
    env = safe_env(TQDM_MININTERVAL="1")  # tqdm: one log line a second at most
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
