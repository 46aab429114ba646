"""`pivotal`: pivotal tuning, new tokens (Textual Inversion) and a LoRA trained together.

It composes the two methods: `embedding` is a textual_inversion concept (`NewTokens`), `lora` a full lora
section (`LoRAMethod`). With `token_steps: 0` both train from the first step, each with its learning rate
(embedding.lr and train.lr); with `token_steps: N` the tokens train alone for N steps and then hold still
while the LoRA trains (the "pivot": the LoRA learns around words that already mean the subject).

Config is pure pydantic; torch and peft are imported only when the method is built.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import Field

from finetune.methods.base import MethodConfig, register_method
from finetune.methods.lora import LoRAConfig, LoRAMethod, check_formats
from finetune.methods.textual_inversion import NewTokens, TokenSettings


@register_method
class PivotalConfig(MethodConfig):
    name: Literal["pivotal"] = "pivotal"
    # diffusers: LoRA + learned_embeds.safetensors; kohya: the LoRA for the UIs, with the A1111 embedding
    # it needs beside it; a1111: the A1111 embedding
    export_formats: ClassVar[frozenset[str]] = frozenset({"diffusers", "kohya", "a1111"})

    embedding: TokenSettings = Field(description="The new token(s), as in the textual_inversion method.")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="The LoRA, as in the lora method.")
    token_steps: int = Field(
        0, ge=0, description="0: tokens and LoRA train together; N: tokens alone for N steps, then the LoRA alone."
    )

    def adds_tokens(self) -> bool:
        return True

    def switchable_adapters(self) -> bool:
        return True

    def trains_text_encoder(self) -> bool:
        return True

    @property
    def tokens(self) -> list[str]:
        return [self.embedding.token]

    def check_recipe(self, recipe) -> None:
        check_formats(self.lora, recipe, None, "method.lora.use_dora")
        self.embedding.check_base(recipe.base, "method.embedding")
        self.embedding.template_check(recipe, "method.embedding")
        if self.token_steps >= recipe.train.max_steps:
            raise ValueError(f"method.token_steps ({self.token_steps}) leaves no step for the LoRA "
                             f"(train.max_steps {recipe.train.max_steps}); lower it, or 0 to train both together")

    def check_family(self, recipe, family) -> None:
        check_formats(self.lora, recipe, family, "method.lora.use_dora")

    def build(self):
        return PivotalMethod(self)


class PivotalMethod:
    def __init__(self, config: PivotalConfig):
        self.config = config
        self.lora = LoRAMethod(config.lora)
        self.tokens = NewTokens(config.embedding, "method.embedding")

    def setup(self, comps, train_lr: float) -> list[dict]:
        """The LoRA's and the tokens' parameter groups; with token_steps N the tokens' groups train in
        steps [0, N) and the LoRA's in [N, end): outside its window a group gets no gradient, no optimizer
        moments and no share of the clip norm, and its learning-rate schedule (warm-up too) runs over its
        window only (the trainer and finetune/train/optim.py read `active_steps`)."""
        self.tokens.add(comps)
        # the LoRA first: peft's injection freezes every non-adapter weight, the embeddings included
        lora_groups = self.lora.setup(comps, train_lr)
        self.tokens.train(comps)
        token_groups = self.tokens.param_groups(comps, train_lr)
        steps = self.config.token_steps
        if steps:
            for g in token_groups:
                g["active_steps"] = (0, steps)
            for g in lora_groups:
                g["active_steps"] = (steps, None)
        return lora_groups + token_groups

    def trained_modules(self) -> list[str]:
        return list(dict.fromkeys(self.lora.trained_modules() + list(self.tokens.ids)))

    def prepare_captions(self, captions: list[str], keys: list[int] | None = None) -> list[str]:
        return self.tokens.prepare_captions(captions, keys)

    def after_step(self, comps) -> None:
        pass  # the phases are parameter groups (see setup): nothing to undo after a step

    def trainable_state(self, comps) -> dict:
        state = self.lora.trainable_state(comps)
        for name, v in self.tokens.vectors(comps).items():
            state[f"{name}.{self.config.embedding.token}"] = v
        return state

    def export(self, comps, out_dir, ctx) -> list:
        """The LoRA (diffusers and/or kohya) and the embedding (diffusers and/or A1111), one model card."""
        from finetune.export.card import write_model_card
        from finetune.export.embeddings import save_embeddings
        from finetune.export.lora import export_lora

        quiet = replace(ctx, model_card=False)
        written = export_lora(comps, self.lora, out_dir, quiet) if {"diffusers", "kohya"} & set(ctx.formats) else []
        forms = [f for f in ("diffusers", "a1111") if f in ctx.formats or (f == "a1111" and "kohya" in ctx.formats)]
        # the kohya LoRA is '<name>.safetensors'; the A1111 embedding beside it needs another name
        written += save_embeddings(self.tokens.vectors(comps), self.config.embedding.token, out_dir,
                                   replace(quiet, name=f"{ctx.name}_emb"), formats=forms, family=comps.family)
        if ctx.model_card:
            written.append(write_model_card(out_dir, ctx, written, kind="pivotal", dora=self.config.lora.use_dora))
        return written
