"""DreamBench metrics: the formulas against a reference on fixed vectors, the prompt sets, and the tiny
evaluation models of the toy world (identical images score 1, shuffled pixels far lower, own captions win)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.eval.formulas import bootstrap, pair_cosines, prompt_fidelity, subject_fidelity
from finetune.eval.prompts import clip_text, expand, prompt_sets, shows_subject

# fixed vectors with simple cosines: e1, (e1 + e2) / sqrt2 scaled by 3, -e2 scaled by 0.5
GEN = [[1.0, 0.0, 0.0], [3.0, 3.0, 0.0], [0.0, -0.5, 0.0]]
REF = [[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]


def reference_cosine(a, b) -> float:
    """cos(a, b) = a.b / (|a| |b|), one pair at a time in plain Python."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_pair_cosines_match_the_reference_formula():
    got = pair_cosines(torch.tensor(GEN), torch.tensor(REF))
    want = [[reference_cosine(g, r) for r in REF] for g in GEN]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert got[1, 0] == pytest.approx(1 / math.sqrt(2), abs=1e-6)  # scale does not matter, direction does


def test_subject_fidelity_is_dreambench_mean_over_all_pairs():
    per_image = subject_fidelity(torch.tensor(GEN), torch.tensor(REF))
    pairs = [reference_cosine(g, r) for g in GEN for r in REF]
    assert float(per_image.mean()) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    # per image: the mean over the references (what the bootstrap resamples)
    assert per_image.tolist() == pytest.approx([0.5, 1 / (2 * math.sqrt(2)), 0.0], abs=1e-6)


def test_prompt_fidelity_pairs_image_i_with_text_i_only():
    texts = [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    got = prompt_fidelity(torch.tensor(GEN), torch.tensor(texts))
    assert got.tolist() == pytest.approx([reference_cosine(g, t) for g, t in zip(GEN, texts, strict=True)], abs=1e-6)
    assert got.tolist() == pytest.approx([0.0, 1.0, -1.0], abs=1e-6)
    with pytest.raises(ValueError):
        prompt_fidelity(torch.tensor(GEN), torch.tensor(texts[:2]))


def test_bootstrap_interval():
    rng = np.random.default_rng(3)
    values = rng.normal(0.6, 0.1, size=400)
    est = bootstrap(values)
    assert est.mean == pytest.approx(values.mean()) and est.n == 400
    assert est.low < est.mean < est.high
    # for a normal sample the 95% interval is about mean +- 1.96 sd / sqrt(n)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (est.high - est.low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap(values) == est  # fixed seed: the same interval every time
    assert bootstrap([0.7] * 5).low == bootstrap([0.7] * 5).high == pytest.approx(0.7)
    assert bootstrap([0.3]) .n == 1


def test_prompt_sets_fill_the_subject():
    sets = prompt_sets()
    assert len(expand("dreambench", "dog", "sks")) == 25 and len(expand("dreambench_live", "dog", "sks")) == 25
    for name in sets:
        prompts = expand(name, "heart", "sks")
        assert all("sks heart" in p and "{}" not in p for p in prompts), name
        assert len(set(prompts)) == len(prompts), name
    assert expand("dreambench", "dog")[0] == "a dog on a wooden kitchen table"


def test_how_prompts_are_read():
    assert shows_subject("a sks dog in the snow", "sks") and not shows_subject("a dog in the snow", "sks")
    assert not shows_subject("a sksx dog", "sks") and shows_subject("anything", None)
    assert clip_text("a sks dog in the snow", "sks", "dog") == "a dog in the snow"
    assert clip_text("a photo of <cat-toy> on a bench", "<cat-toy>", "toy") == "a photo of toy on a bench"
    assert clip_text("a photo of sks", "sks") == "a photo of"
    assert clip_text("a blue square", "sks", "heart") == "a blue square"


# ------------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def models():
    from finetune.eval.embedders import EvalModels

    return EvalModels("toy", "toy")


def _scorer(models, refs, metrics=("clip_i", "dino")):
    from finetune.eval.scoring import Scorer

    return Scorer(list(metrics), models, refs)


def test_identical_images_score_one_and_shuffled_pixels_far_lower(models):
    from finetune.eval.toy_build import shuffle_pixels
    from finetune.toy import world

    images = [im for im, _ in world.subject_images("checkered_heart", 3, seed=321)]
    images += [im for im, _ in world.subject_images("red_heart", 3, seed=321)]
    images += [im for im, _ in world.world_images(6, seed=321)]
    shuffled_images = [shuffle_pixels(im, 1000 + k) for k, im in enumerate(images)]
    same, shuffled = {}, {}
    for m, embedder in (("clip_i", models.clip), ("dino", models.dino)):
        emb = embedder.images(images)
        # image k against itself (a copy embedded apart) and against its own pixels shuffled
        same[m] = torch.diagonal(pair_cosines(embedder.images([im.copy() for im in images]), emb)).tolist()
        shuffled[m] = torch.diagonal(pair_cosines(embedder.images(shuffled_images), emb)).tolist()
    # the same through the scorer: a set of copies of one image against that image
    assert _scorer(models, images[:1]).score([[images[0]] * 3], ["x"]).means() == pytest.approx(
        {"clip_i": 1.0, "dino": 1.0}, abs=1e-5)
    for m in ("clip_i", "dino"):
        assert same[m] == pytest.approx([1.0] * len(images), abs=1e-5), m
    # measured with the shipped models: CLIP-I 0.06 on average (max 0.56), DINO 0.40 (max 0.84)
    assert np.mean(shuffled["clip_i"]) < 0.25 and max(shuffled["clip_i"]) < 0.7, shuffled["clip_i"]
    assert np.mean(shuffled["dino"]) < 0.5 and max(shuffled["dino"]) < 0.9, shuffled["dino"]


def unrelated_caption(caption: str, others: list[str]) -> str:
    """The first of `others` sharing no colour, shape or pattern word with `caption`."""
    from finetune.toy import world

    content = set(world.COLOURS) | set(world.SHAPES) | {"heart", "checkered", "striped"}
    mine = set(caption.split()) & content
    return next(o for o in others if not set(o.split()) & mine)


def test_clip_t_prefers_the_images_own_caption(models):
    from finetune.eval.scoring import Scorer
    from finetune.toy import world

    pairs = world.world_images(40, seed=77) + world.subject_images("striped_star", 4, seed=77)
    pairs += world.subject_images("red_heart", 4, seed=77)
    images, captions = [im for im, _ in pairs], [c for _, c in pairs]
    unrelated = [unrelated_caption(c, captions[k + 1:] + captions[:k]) for k, c in enumerate(captions)]
    scorer = Scorer(["clip_t"], models, [])
    own = torch.cat(scorer.per_image([[im] for im in images], captions)["clip_t"])
    other = torch.cat(scorer.per_image([[im] for im in images], unrelated)["clip_t"])
    assert bool((own > other).all()), [(c, u) for c, u, a, b in zip(captions, unrelated, own, other, strict=True) if a <= b]
    assert float(own.mean() - other.mean()) > 0.5  # measured: 0.69 against -0.08
    # and 'a sks heart' is read as 'a heart', which a red heart matches better than a blue square does
    heart, square = world.subject_images("red_heart", 1, seed=5)[0][0], world.draw("square", "blue")
    t = Scorer(["clip_t"], models, [], token="sks", class_word="heart").per_image([[heart], [square]],
                                                                                  ["a sks heart"] * 2)["clip_t"]
    plain = scorer.per_image([[heart]], ["a heart"])["clip_t"]
    assert float(t[0]) == pytest.approx(float(plain[0]), abs=1e-6)
    assert float(t[0]) > float(t[1]) + 0.2


def test_subject_fidelity_tells_subjects_apart(models):
    from finetune.toy import world

    refs = [im for im, _ in world.subject_images("checkered_heart", 6, seed=1)]
    scorer = _scorer(models, refs)
    rows = [[im for im, _ in world.subject_images(name, 6, seed=2)] for name in ("checkered_heart", "red_heart")]
    rows.append([im for im, _ in world.world_images(6, seed=2)])
    per_row = [r for r in scorer.score(rows, ["a", "b", "c"]).rows]
    for m in ("clip_i", "dino"):
        same, other_subject, world_ = (r[m] for r in per_row)
        assert same > other_subject + 0.2 and same > world_ + 0.2, (m, per_row)


def test_unknown_evaluation_model_is_one_line(tmp_path):
    from finetune.errors import ModelError
    from finetune.eval.embedders import load_dino

    with pytest.raises(ModelError) as e:
        load_dino(str(tmp_path / "nowhere"), key="validation.dino_model")
    assert "validation.dino_model" in str(e.value) and "\n" not in str(e.value)
