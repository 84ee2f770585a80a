"""Measure the committed toy demo models on fresh generated scenes (ONNX Runtime, one thread).

    .venv/bin/python engine_build/demo_report.py [--scenes 400] [--seed 777]

Prints JSON: VLM yes/no accuracy, AUC and ECE on presence questions; accuracy on holding hard negatives
and on near/far; step-by-step final-answer accuracy; the language prior's bias on the correlated
statement; CLIP AUC per concept and the cosine of rule texts for relevant vs irrelevant scenes;
detector hit rate; latency of one image + 16 questions. Toy models on toy scenes only.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from safejudge.backends.onnx_demo import load_demo_models
from safejudge.constitution import load_constitution
from safejudge.decision import parse_reasoning
from safejudge.evaluation import TOY_CONSTITUTION, rule_violated
from safejudge.toyworld import CONCEPTS, HOLDABLE, Correlation, SceneSpec, generate_scene


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    positive, negative = scores[labels], scores[~labels]
    if not len(positive) or not len(negative):
        return float("nan")
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def ece(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (scores >= low) & (scores < high) if high < 1 else (scores >= low)
        if inside.any():
            total += inside.mean() * abs(scores[inside].mean() - labels[inside].mean())
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    models = load_demo_models()
    rng = np.random.default_rng(args.seed)
    scenes = [generate_scene(rng) for _ in range(args.scenes)]
    result: dict = {"scenes": args.scenes, "seed": args.seed}

    scores, labels = [], []
    for scene in scenes:  # every concept asked of every scene
        scores.extend(models.mllm.score(scene.image, [f"a {c} is visible" for c in CONCEPTS]))
        labels.extend(c in scene.concepts for c in CONCEPTS)
    scores, labels = np.array(scores), np.array(labels)
    result["presence"] = {"questions": len(scores), "accuracy": float(((scores > 0.5) == labels).mean()),
                          "auc": auc(scores, labels), "ece": ece(scores, labels)}

    def relation_accuracy(spec_true, spec_false, question, count=100):
        right = 0
        for index in range(count):
            scene = generate_scene(rng, spec_true(index) if index % 2 == 0 else spec_false(index))
            q = question(index)
            right += (models.mllm.score(scene.image, [q])[0] > 0.5) == scene.truth(q)
        return right / count

    result["holding_hard_negatives_accuracy"] = relation_accuracy(
        lambda i: SceneSpec(held=(HOLDABLE[i % 6],)), lambda i: SceneSpec(not_held=(HOLDABLE[i % 6],)),
        lambda i: f"a person is holding a {HOLDABLE[i % 6]}")
    result["near_far_accuracy"] = relation_accuracy(
        lambda i: SceneSpec(near=(("flame", "house"),)), lambda i: SceneSpec(far=(("flame", "house"),)),
        lambda i: "a flame is near a house")

    right = parsed = 0
    questions = 0
    for scene in scenes[:100]:
        asked = [f"a {c} is visible" for c in rng.choice(CONCEPTS, 2, replace=False)]
        asked.append(f"a person is holding a {rng.choice(HOLDABLE)}")
        for q, raw in zip(asked, models.mllm.reason(scene.image, asked), strict=True):
            answer = parse_reasoning(raw)
            parsed += answer.parsed
            right += answer.parsed and answer.holds == scene.truth(q)
            questions += 1
    result["reasoning"] = {"questions": questions, "parsed": parsed / questions, "final_answer_accuracy": right / questions}

    statements = ["blood is visible", "a knife is visible", "a person is visible", "a skull is visible",
                  "a person is holding a knife", "a flame is near a house", "something dangerous is visible"]
    result["priors"] = dict(zip(statements, map(float, models.mllm.score(None, statements)), strict=True))
    knives = [generate_scene(rng, SceneSpec(objects=("knife",), absent=("blood",), extra=0)) for _ in range(50)]
    plain = [generate_scene(rng, SceneSpec(objects=("ball",), absent=("blood", "knife"), extra=0)) for _ in range(50)]
    result["correlation_bias"] = {
        "note": "M('blood is visible') on scenes without blood; training put blood next to 80% of knives",
        "with_knife": float(np.mean([models.mllm.score(s.image, ["blood is visible"])[0] for s in knives])),
        "with_ball": float(np.mean([models.mllm.score(s.image, ["blood is visible"])[0] for s in plain])),
        "knife_training_correlation": Correlation("knife", "blood", 0.8).probability,
    }

    images = models.relevance.embed_images([s.image for s in scenes])
    texts = models.relevance.embed_texts([f"a {c}" for c in CONCEPTS])
    per_concept = {c: auc(images @ texts[i], np.array([c in s.concepts for s in scenes])) for i, c in enumerate(CONCEPTS)}
    result["clip_auc_per_concept"] = per_concept
    result["clip_mean_auc"] = float(np.mean(list(per_concept.values())))
    constitution = load_constitution(TOY_CONSTITUTION)
    rule_texts = models.relevance.embed_texts([r.text for r in constitution.rules])
    relevant, irrelevant = [], []
    for scene, image in zip(scenes, images, strict=True):
        for rule, text in zip(constitution.rules, rule_texts, strict=True):
            (relevant if rule_violated(rule, scene) else irrelevant).append(float(image @ text))
    result["rule_cosine"] = {
        "violated_min": min(relevant, default=float("nan")), "violated_p05": float(np.percentile(relevant, 5)) if relevant else None,
        "not_violated_median": float(np.median(irrelevant)),
        "kept_violated_at_0.22": float(np.mean(np.array(relevant) > 0.22)) if relevant else None,
        "filtered_not_violated_at_0.22": float(np.mean(np.array(irrelevant) <= 0.22)),
    }

    hits = 0
    for index in range(100):
        concept = CONCEPTS[index % len(CONCEPTS)]
        scene = generate_scene(rng, SceneSpec(objects=(concept,)))
        (found,) = models.detector.detect(scene.image, [concept])
        cx = cy = None
        if found is not None:
            cx, cy = (found.box[0] + found.box[2]) / 2, (found.box[1] + found.box[3]) / 2
        hits += cx is not None and any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in scene.boxes(concept))
    result["detector_center_hit_rate"] = hits / 100

    questions16 = [f"a {c} is visible" for c in CONCEPTS] + ["a person is holding a knife", "a flame is near a house",
                                                             "something dangerous is visible"]
    for _ in range(5):
        models.mllm.score(scenes[0].image, questions16)
    started = time.perf_counter()
    for scene in scenes[:100]:
        models.mllm.score(scene.image, questions16)
    result["ms_one_image_16_questions"] = (time.perf_counter() - started) * 10.0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
