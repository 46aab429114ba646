"""The evaluation models, loaded through transformers: a CLIP model (CLIP-I, CLIP-T) and a self-supervised
ViT (DINO). Loaded lazily, kept on the CPU between uses, and moved to the compute device only while scoring.

Defaults are the models DreamBench used: `openai/clip-vit-base-patch32` and `facebook/dino-vits16` (any
CLIPModel, and any ViT / DINOv2 checkpoint, work). `toy` names the tiny models shipped for the toy world.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.eval import DEFAULT_CLIP, DEFAULT_DINO

TOY = "toy"
TOY_DIR = Path(__file__).resolve().parent / "toy_models"
BATCH = 32


def resolve(model_id: str, kind: str) -> str:
    """'toy' -> the shipped tiny model of that kind (clip or dino); anything else as given."""
    return str(TOY_DIR / kind) if model_id == TOY else model_id


def _quietly():
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()  # load reports and bars for a model that loads in a blink
    tlog.disable_progress_bar()
    return level


def _load(loader, model_id: str, kind: str, key: str, **kw):
    level = _quietly()
    try:
        return loader(resolve(model_id, kind), **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{key} '{model_id}': cannot load it ({first[:160]}); use a local folder, a hub id already in the "
            "cache (download it once with network access), or 'toy' for the toy base"
        ) from None
    finally:
        from transformers.utils import logging as tlog

        tlog.set_verbosity(level[0])
        if level[1]:
            tlog.enable_progress_bar()


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output (projected features in pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Embedder:
    """A model plus its preprocessing; embeddings come back as float32 on the CPU."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval().requires_grad_(False), processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        chunks = []
        for i in range(0, len(images), BATCH):
            px = self.processor(images=[im.convert("RGB") for im in images[i:i + BATCH]], return_tensors="pt")
            chunks.append(self._image_features(px["pixel_values"].to(self.device, self.dtype)).float().cpu())
        return torch.cat(chunks)


class ClipEmbedder(_Embedder):
    def __init__(self, model, processor, tokenizer):
        super().__init__(model, processor)
        self.tokenizer = tokenizer

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), BATCH):
            tok = self.tokenizer(texts[i:i + BATCH], padding=True, truncation=True, return_tensors="pt",
                                 max_length=self.model.config.text_config.max_position_embeddings)
            tok = {k: v.to(self.device) for k, v in tok.items()}
            chunks.append(_features(self.model.get_text_features(**tok)).float().cpu())
        return torch.cat(chunks)


class DinoEmbedder(_Embedder):
    """The class token of the last layer, the image descriptor DINO's authors (and DreamBench) use."""

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def load_clip(model_id: str, dtype: torch.dtype = torch.float32, key: str = "clip_model") -> ClipEmbedder:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = _load(CLIPModel.from_pretrained, model_id, "clip", key, dtype=dtype)
    return ClipEmbedder(model, _load(AutoImageProcessor.from_pretrained, model_id, "clip", key),
                        _load(AutoTokenizer.from_pretrained, model_id, "clip", key))


def load_dino(model_id: str, dtype: torch.dtype = torch.float32, key: str = "dino_model") -> DinoEmbedder:
    from transformers import AutoImageProcessor, AutoModel

    model = _load(AutoModel.from_pretrained, model_id, "dino", key, dtype=dtype)
    if not hasattr(model.config, "image_size"):
        raise ModelError(f"{key} '{model_id}': a {type(model).__name__}, not a vision transformer; use a ViT or "
                         "DINOv2 checkpoint such as facebook/dino-vits16")
    return DinoEmbedder(model, _load(AutoImageProcessor.from_pretrained, model_id, "dino", key))


class EvalModels:
    """CLIP and DINO, each loaded on first use; `on(device)` borrows the device for one scoring pass."""

    def __init__(self, clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO,
                 dtype: torch.dtype = torch.float32, keys: tuple[str, str] = ("clip_model", "dino_model")):
        self.ids, self.dtype, self.keys = (clip_model, dino_model), dtype, keys
        self._clip: ClipEmbedder | None = None
        self._dino: DinoEmbedder | None = None
        self._device: torch.device | None = None

    @property
    def clip(self) -> ClipEmbedder:
        if self._clip is None:
            self._clip = load_clip(self.ids[0], self.dtype, self.keys[0])
            if self._device is not None:
                self._clip.to(self._device)
        return self._clip

    @property
    def dino(self) -> DinoEmbedder:
        if self._dino is None:
            self._dino = load_dino(self.ids[1], self.dtype, self.keys[1])
            if self._device is not None:
                self._dino.to(self._device)
        return self._dino

    @contextlib.contextmanager
    def on(self, device):
        """Models on `device` inside the block, back on the CPU after (off the training path's memory)."""
        device = torch.device(device)
        self._device = device
        for m in (self._clip, self._dino):
            if m is not None:
                m.to(device)
        try:
            yield self
        finally:
            self._device = None
            if device.type != "cpu":
                for m in (self._clip, self._dino):
                    if m is not None:
                        m.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
