"""finetune/run.py with one fault injected into one process, for the multi-process failure tests.

FINETUNE_TEST_FAULT=<rank>:<kind>[:<step>]   kind: data (a DataError, as a bad image with on_bad_image:
error raises), hang (the process stops answering), disk (the checkpoint finds the disk full).
FINETUNE_TEST_FAULT_MARK=<file>              written when the fault fires (the test times the stop from it).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fire() -> None:
    Path(os.environ["FINETUNE_TEST_FAULT_MARK"]).write_text(str(time.time()))


def _inject(kind: str, at: int) -> None:
    from finetune.errors import DataError, UserError
    from finetune.train import checkpoint
    from finetune.train.trainer import Trainer

    if kind == "disk":
        def full(root, needed):
            _fire()
            raise UserError(f"not enough disk space for a checkpoint in {root}: (injected) free some space")
        checkpoint._check_space = full
        return
    step = Trainer.train_step

    def faulty(self, batch):
        if self.state.step + 1 == at:
            _fire()
            if kind == "data":
                raise DataError(f"{batch['paths'][0]}: cannot decode the image (injected); fix or remove it")
            time.sleep(3600)  # hang
        return step(self, batch)

    Trainer.train_step = faulty


if __name__ == "__main__":
    rank, kind, *at = os.environ["FINETUNE_TEST_FAULT"].split(":")
    if os.environ.get("RANK") == rank:
        _inject(kind, int(at[0]) if at else 2)
    from finetune.run import main

    main()
