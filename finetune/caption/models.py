"""Vision-language captioners that transformers runs natively: loading, prompts per model kind, batched generation.

Two kinds of prompt, chosen by the model, not by the caller:
- task models (Florence-2) take a task token per style (`<CAPTION>`, `<DETAILED_CAPTION>`);
- chat models (SmolVLM, Qwen2.5-VL, Qwen3-VL, Idefics3, LLaVA, ... anything whose processor has a chat
  template) take an instruction per style, and only the newly generated tokens are decoded.

Repository code is never run (`trust_remote_code=False`): a checkpoint that needs it is refused with a pointer
to a native one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from finetune.caption.text import STYLES
from finetune.errors import ModelError

FLORENCE_BASE = "florence-community/Florence-2-base"
SMOLVLM_256M = "HuggingFaceTB/SmolVLM-256M-Instruct"
# Florence-2 is the best small captioner for sentences but has no tagging task, so tags default to a chat model.
DEFAULT_MODELS = {"short": FLORENCE_BASE, "detailed": FLORENCE_BASE, "tags": SMOLVLM_256M}
# What a style asks for and how many new tokens it may take (CLIP reads 75 of them; T5 families read more).
MAX_NEW_TOKENS = {"short": 40, "detailed": 160, "tags": 80}

# Larger models that load the same way (documented in docs/captioning.md; the table is what --list-models prints).
KNOWN_MODELS = (
    (FLORENCE_BASE, "0.23B", "short, detailed", "default for sentences; the smallest, runs on a CPU"),
    ("florence-community/Florence-2-large", "0.77B", "short, detailed", "more detail, slower"),
    (SMOLVLM_256M, "0.26B", "short, detailed, tags", "default for tags; follows instructions loosely"),
    ("HuggingFaceTB/SmolVLM-500M-Instruct", "0.51B", "short, detailed, tags", ""),
    ("Qwen/Qwen2.5-VL-3B-Instruct", "3B", "short, detailed, tags", "the family peers caption with; GPU; needs torchvision"),
    ("Qwen/Qwen3-VL-2B-Instruct", "2B", "short, detailed, tags", "GPU; needs torchvision"),
    ("Qwen/Qwen3-VL-8B-Instruct", "8B", "short, detailed, tags", "GPU (~17 GB of weights in bf16); needs torchvision"),
)

INSTRUCTIONS = {
    "short": "Describe this image in one short sentence. Name the main subject first. No preamble.",
    "detailed": (
        "Describe this image in two or three sentences: the main subject and its appearance, what it is doing, "
        "the setting, the lighting and the style of the image. No preamble."
    ),
    "tags": (
        "List tags for this image, separated by commas, most important first: subject, appearance, clothing, "
        "action, setting, lighting, style. Only the tags."
    ),
}


class Prompts(Protocol):
    """How one kind of model is asked for a caption and how its answer is read back."""

    styles: tuple[str, ...]

    def inputs(self, processor, images: list, style: str) -> Any: ...

    def answers(self, processor, generated, inputs) -> list[str]: ...


class TaskPrompts:
    """Florence-2: a task token per style; the decoder's output is the answer."""

    TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>"}
    styles = tuple(TASKS)

    def inputs(self, processor, images, style):
        return processor(text=[self.TASKS[style]] * len(images), images=images, return_tensors="pt")

    def answers(self, processor, generated, inputs):
        return processor.batch_decode(generated, skip_special_tokens=True)


class ChatPrompts:
    """Chat models: the style's instruction after the image, through the model's own chat template."""

    styles = STYLES

    def inputs(self, processor, images, style):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTIONS[style]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        processor.tokenizer.padding_side = "left"  # decoder-only: pad on the left so generation continues the prompt
        return processor(text=[prompt] * len(images), images=[[im] for im in images], padding=True,
                         return_tensors="pt")

    def answers(self, processor, generated, inputs):
        new = generated[:, inputs["input_ids"].shape[1]:]  # the prompt is echoed back: keep what follows it
        return processor.batch_decode(new, skip_special_tokens=True)


TASK_MODELS = {"florence2": TaskPrompts}


def prompts_for(model_type: str, processor, model_id: str) -> Prompts:
    if model_type in TASK_MODELS:
        return TASK_MODELS[model_type]()
    if getattr(processor, "chat_template", None):
        return ChatPrompts()
    raise ModelError(
        f"{model_id}: a {model_type} model without a chat template, so it cannot be asked for a caption style; "
        f"use a chat model or Florence-2 (python tools/caption.py --list-models)"
    )


# ---------------------------------------------------------------------------------------------- devices
def pick_device(name: str = "auto") -> str:
    import torch

    if name != "auto":
        try:
            kind = torch.device(name).type
        except RuntimeError:
            raise ModelError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str, device: str):
    """The compute dtype: bf16 on GPUs that have it, else fp16 on accelerators, fp32 on CPUs (CPU half
    precision is slower than fp32 for generation on most machines)."""
    import torch

    from finetune.train.setup import DTYPES

    if name != "auto":
        if name not in DTYPES:
            raise ModelError(f"--dtype {name}: not one of auto, fp32, fp16, bf16")
        return DTYPES[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Captioner:
    """A loaded model and processor; `caption(images, style)` captions a batch of upright RGB PIL images."""

    model_id: str
    model: Any
    processor: Any
    prompts: Prompts
    device: str
    dtype: Any

    def supports(self, style: str) -> bool:
        return style in self.prompts.styles

    def caption(self, images: list, style: str, max_new_tokens: int | None = None) -> list[str]:
        import torch

        if not self.supports(style):
            raise ModelError(f"{self.model_id}: has no '{style}' style (it has {', '.join(self.prompts.styles)}); "
                             f"use --model {DEFAULT_MODELS[style]} for {style}")
        inputs = self.prompts.inputs(self.processor, images, style).to(self.device)
        inputs = {k: v.to(self.dtype) if torch.is_tensor(v) and torch.is_floating_point(v) else v
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[style],
                                      do_sample=False)
        return self.prompts.answers(self.processor, out, inputs)


def load_captioner(model_id: str, device: str = "auto", dtype: str = "auto") -> Captioner:
    """Load a natively supported image-text-to-text model and its processor; one-line ModelError otherwise.
    'toy' is the toy world's offline captioner (finetune/caption/toy.py)."""
    if model_id == "toy":
        from finetune.caption.toy import ToyCaptioner

        return ToyCaptioner()
    local = {"local_files_only": True} if needs_local_files(model_id) else {}  # before transformers loads
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = _native_config(model_id, local)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=False, **local)
        model, info = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=torch_dtype, trust_remote_code=False, output_loading_info=True, **local
        )
    except ImportError as e:  # e.g. a processor that needs torchvision or num2words
        raise ModelError(f"{model_id}: its processor needs a missing package ({_first_line(e)})") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_id}: cannot be loaded ({_first_line(e)})") from None
    missing = info.get("missing_keys") or []
    if missing:  # random weights would caption nonsense without an error: refuse instead
        raise ModelError(f"{model_id}: {len(missing)} weight(s) missing from the checkpoint, e.g. "
                         f"{sorted(missing)[0]}; it does not match transformers' {config.model_type} architecture")
    model.to(dev).eval()
    return Captioner(model_id, model, processor, prompts_for(config.model_type, processor, model_id), dev, torch_dtype)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here (one quick connection, no retries), or None when it can or we
    cannot tell (a proxy is configured: the library goes through it, a direct connection proves nothing)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached from here ({e.strerror or e})"
    return None


def needs_local_files(model_id: str) -> bool:
    """True when a hub id must come from the local cache (offline, or the hub unreachable: the library would
    spend half a minute retrying). Not cached either: a one-line ModelError saying what to do."""
    from pathlib import Path

    from huggingface_hub import constants, try_to_load_from_cache

    if Path(model_id).expanduser().is_dir():
        return False
    try:
        cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a hub id either (a folder that is not there): the loader says "not found"
        return False
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if why is None:
        return False  # online: the library downloads it, or checks the cached copy
    if cached:
        return True  # offline: straight from the cache, no connection attempts (nor their retries)
    raise ModelError(f"{model_id}: not downloaded here and {why}; download it once where there is a network "
                     f"(hf download {model_id}), give a local folder with --model, or try the workflow offline "
                     "with --model toy (the toy world's captioner)")


def _native_config(model_id: str, local: dict | None = None):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False, **(local or {}))
    except OSError as e:
        raise ModelError(f"{model_id}: not found ({_first_line(e)}); give a local folder or a hub id "
                         "(python tools/caption.py --list-models), or --model toy to try the workflow offline") from None
    except ValueError as e:
        raise ModelError(f"{model_id}: {_remote_code_hint(model_id)} ({_first_line(e)})") from None
    if getattr(config, "auto_map", None):
        raise ModelError(f"{model_id}: {_remote_code_hint(model_id)}")
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelError(f"{model_id}: a {config.model_type} model, not an image-text-to-text one; "
                         "see python tools/caption.py --list-models")
    return config


def _remote_code_hint(model_id: str) -> str:
    native = " (native copy: florence-community/Florence-2-base or -large)" if "florence" in model_id.lower() else ""
    return ("this checkpoint needs its repository's own code (trust_remote_code), which we never run; "
            f"use a natively supported one{native}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
