"""Caption a folder: find the images that need a caption, caption them in batches, write each file atomically.

Resumable by construction: an image whose caption file exists is skipped (unless `overwrite`), every file is
written to a temporary name and renamed into place, and SIGINT/SIGTERM finish the current batch, write it and
stop. Running the same command again continues with the images still uncaptioned.
"""

from __future__ import annotations

import glob
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.caption.models import DEFAULT_MODELS, STYLES, Captioner, load_captioner
from finetune.caption.text import Binding, finish
from finetune.data.images import BadImage, decode
from finetune.data.records import image_files, need_dir
from finetune.errors import DataError, UserError


@dataclass(frozen=True)
class CaptionOptions:
    model: str | None = None  # hub id or local folder; None: the style's default (DEFAULT_MODELS)
    style: str = "short"  # short | detailed | tags
    prefix: str = ""  # put before every caption, verbatim ("photo of sks dog, ")
    suffix: str = ""  # put after every caption, verbatim
    trigger: str | None = None  # the subject's trigger word ...
    class_words: tuple[str, ...] = ()  # ... placed before the first of these words ("a dog" -> "a sks dog")
    overwrite: bool = False  # replace existing caption files
    fill_empty: bool = False  # also caption images whose caption file is empty (it is replaced)
    dry_run: bool = False  # caption and print, write nothing
    limit: int | None = None  # stop after this many captions (previews)
    batch_size: int = 8
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # auto: bf16 (fp16) on GPUs, fp32 on CPUs
    max_new_tokens: int | None = None  # None: the style's budget
    recursive: bool = False  # images in sub-folders too
    caption_ext: str = ".txt"

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODELS[self.style]

    @property
    def binding(self) -> Binding:
        return Binding(self.prefix, self.suffix, self.trigger, tuple(self.class_words))

    def check(self) -> None:
        """One-line UserError naming the option, before anything is loaded."""
        if self.style not in STYLES:
            raise UserError(f"--style {self.style}: not one of {', '.join(STYLES)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: must be at least 1")
        if not self.caption_ext.startswith(".") or "/" in self.caption_ext or len(self.caption_ext) < 2:
            raise UserError(f"--caption-ext {self.caption_ext!r}: give an extension such as .txt")
        if self.class_words and not self.trigger:
            raise UserError("--class-word needs --trigger (the word to put before it)")


@dataclass
class CaptionResult:
    """What a run did; `written` / `planned` hold (caption file, caption) pairs."""

    folder: str
    model: str
    written: list[tuple[str, str]] = field(default_factory=list)
    planned: list[tuple[str, str]] = field(default_factory=list)  # dry run: what would be written
    skipped: list[str] = field(default_factory=list)  # images that already have a caption
    unreadable: list[str] = field(default_factory=list)  # "path: why"
    empty: list[str] = field(default_factory=list)  # the model gave nothing usable: left uncaptioned
    kept: list[str] = field(default_factory=list)  # a caption file appeared meanwhile: left alone
    remaining: int = 0  # images still to caption when the run stopped early
    stopped_by: str | None = None
    seconds: float = 0.0  # captioning time, model loading excluded

    @property
    def captioned(self) -> int:
        return len(self.written) + len(self.planned)

    @property
    def captions_per_s(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"captioned": self.captioned, "captions_per_s": self.captions_per_s}


def caption_target(image: Path, ext: str) -> Path:
    return image.with_suffix(ext)


def plan(root: Path, opts: CaptionOptions) -> tuple[list[Path], list[Path]]:
    """(images to caption, images skipped because they have a caption)."""
    todo, skipped = [], []
    for img in image_files(root, opts.recursive):
        cap = caption_target(img, opts.caption_ext)
        has = cap.is_file() and (not opts.fill_empty or cap.read_text(encoding="utf-8", errors="replace").strip())
        (skipped if has and not opts.overwrite else todo).append(img)
    return todo, skipped


def sweep_temp_files(images: list[Path], ext: str, older_than_s: float = 60.0) -> int:
    """Remove our own temporary caption files left by a killed run (`.<name>.txt.XXXX.tmp`), never anything
    else; only stale ones, so a second run in the same folder cannot pull a live write from under the first."""
    gone, now = 0, time.time()
    for img in images:
        cap = caption_target(img, ext)
        for tmp in cap.parent.glob(f".{glob.escape(cap.name)}.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
    return gone


def caption_folder(folder: str | Path, options: CaptionOptions | None = None, *, captioner: Captioner | None = None,
                   progress: bool = True, echo: Callable[[str], None] | None = print,
                   stop: Callable[[], bool] | None = None) -> CaptionResult:
    """Caption every image of `folder` that needs it (the studio and tools/caption.py both call this).

    `captioner`: an already loaded model to reuse; `echo`: receives one line per caption (None: silent);
    `stop`: polled between batches (SIGINT/SIGTERM are also honoured when called from the main thread)."""
    opts = options or CaptionOptions()
    opts.check()
    root = need_dir(str(folder), "the FOLDER argument")
    todo, skipped = plan(root, opts)
    if not todo and not skipped:
        raise DataError(f"{root}: no images found; add .png/.jpg/.webp images"
                        + ("" if opts.recursive else " (or pass --recursive for sub-folders)"))
    sweep_temp_files(todo + skipped, opts.caption_ext)
    result = CaptionResult(str(root), opts.model_id, skipped=[str(p) for p in skipped])
    if not todo:
        return result
    captioner = captioner or load_captioner(opts.model_id, opts.device, opts.dtype)
    if not captioner.supports(opts.style):
        captioner.caption([], opts.style)  # raises the one-line "has no such style" error
    _run(todo, opts, captioner, result, progress, echo, stop)
    return result


def _run(todo, opts, captioner, result, progress, echo, stop) -> None:
    from tqdm.auto import tqdm

    from finetune.train.setup import StopFlag

    flag = StopFlag()
    flag.install()
    start = time.perf_counter()
    try:
        total = min(len(todo), opts.limit or len(todo))
        with tqdm(total=total, desc="captioning", unit="img", disable=not progress, dynamic_ncols=True,
                  file=sys.stderr) as bar:
            i = 0
            while i < len(todo) and result.captioned < (opts.limit or len(todo)):
                if flag.requested or (stop and stop()):
                    result.stopped_by = flag.signal_name or "request"
                    result.remaining = len(todo) - i
                    break
                size = min(opts.batch_size, (opts.limit or len(todo)) - result.captioned)
                batch, i = todo[i : i + size], i + size
                _caption_batch(batch, opts, captioner, result, _sayer(echo, bar if progress else None))
                bar.update(len(batch))
    finally:
        flag.restore()
        result.seconds = time.perf_counter() - start


def _sayer(echo, bar) -> Callable[[str], None]:
    """Caption lines go to `echo`; above the progress bar (which lives on stderr) when there is one."""
    if echo is None:
        return lambda line: None
    if bar is None:
        return echo

    def say(line: str) -> None:
        bar.clear()
        echo(line)
        bar.refresh()

    return say


def _caption_batch(batch: list[Path], opts: CaptionOptions, captioner: Captioner, result: CaptionResult,
                   say: Callable[[str], None]) -> None:
    images, paths = [], []
    for path in batch:
        try:
            images.append(decode(path.read_bytes()))
            paths.append(path)
        except (BadImage, OSError) as e:
            result.unreadable.append(f"{path}: {e}")
            say(f"skipped {path.name}: {e}")
    if not images:
        return
    answers = captioner.caption(images, opts.style, opts.max_new_tokens)
    for path, raw in zip(paths, answers, strict=True):
        _write_one(path, finish(raw, opts.style, opts.binding), opts, result, say)


def _write_one(path: Path, text: str, opts: CaptionOptions, result: CaptionResult, say) -> None:
    from finetune.export.io import write_text_atomic, write_text_new

    target = caption_target(path, opts.caption_ext)
    if not text:
        result.empty.append(str(path))
        say(f"{path.name}: the model gave no caption; left uncaptioned")
        return
    if opts.dry_run:
        result.planned.append((str(target), text))
        say(f"would write {target.name}: {text}")
        return
    replace_it = opts.overwrite or (opts.fill_empty and target.is_file()
                                    and not target.read_text(encoding="utf-8", errors="replace").strip())
    try:
        if replace_it:
            write_text_atomic(target, text + "\n")
        else:
            write_text_new(target, text + "\n")  # refuses a caption file that appeared meanwhile
    except FileExistsError:
        result.kept.append(str(target))
        say(f"{target.name}: appeared while captioning; left alone")
        return
    result.written.append((str(target), text))
    say(f"{target.name}: {text}")


def summary(result: CaptionResult, opts: CaptionOptions) -> str:
    """The closing lines tools/caption.py prints."""
    verb = "would write" if opts.dry_run else "wrote"
    n = result.captioned
    parts = [f"{verb} {n} caption(s) with {result.model} in {result.seconds:.1f} s"
             + (f" ({result.captions_per_s:.2f} captions/s)" if n else "")]
    if result.skipped:
        parts.append(f"{len(result.skipped)} image(s) already captioned, skipped (--overwrite replaces them)")
    for what, items in (("unreadable image(s) skipped", result.unreadable), ("left uncaptioned (empty answer)",
                        result.empty), ("caption file(s) appeared meanwhile, left alone", result.kept)):
        if items:
            parts.append(f"{len(items)} {what}: {items[0]}" + (" ..." if len(items) > 1 else ""))
    if result.stopped_by:
        parts.append(f"stopped by {result.stopped_by}; {result.remaining} image(s) left: run the same command "
                     "again to resume")
    return "\n".join(parts)


__all__ = ["CaptionOptions", "CaptionResult", "caption_folder", "plan", "summary"]
