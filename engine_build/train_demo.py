"""Train the toy-world demo models and export them to ONNX under safejudge/demo_models/.

    OMP_NUM_THREADS=1 .venv/bin/python engine_build/train_demo.py vlm
    OMP_NUM_THREADS=1 .venv/bin/python engine_build/train_demo.py clip
    OMP_NUM_THREADS=1 .venv/bin/python engine_build/train_demo.py detector

Each run: fixed seed, fixed step count, one CPU thread, minutes (committed models, on a shared 2-core
machine: vlm 1700 steps 842 s, clip 1200 steps 537 s, detector 1000 steps 335 s; each run records itself
in safejudge/demo_models/manifest.json; measurements in benchmarks/QUALITY.md). Training data is generated on the fly by
safejudge.toyworld (a fresh scene every time, so there is nothing to overfit), with a spurious
correlation injected (blood appears next to 80 % of knives) so that the bias CLUE corrects exists here.
These are toy models: they understand only generated toy-world scenes and must never judge real photos.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from safejudge.toyworld import (
    CONCEPTS,
    HAZARDS,
    HOLDABLE,
    NEAR_PAIRS,
    SCENE_SIZE,
    Correlation,
    Query,
    Scene,
    SceneError,
    SceneSpec,
    ToyTokenizer,
    demo_vocabulary,
    generate_scene,
    model_input,
    statement_text,
)

OUT = Path(__file__).resolve().parent.parent / "safejudge" / "demo_models"
TRAIN_CORRELATIONS = (Correlation("knife", "blood", 0.8),)
AUX_LABELS = (*CONCEPTS, *(f"held:{c}" for c in HOLDABLE), *(f"near:{a}:{b}" for a, b in NEAR_PAIRS))
DIM, HEADS, VISUAL_GRID = 128, 4, 6
MAX_TEXT = 64  # statement + answer tokens

# ---------------------------------------------------------------- data


def training_scene(rng: np.random.Generator) -> Scene:
    """A scene from a mixture that makes relations and hard negatives common enough to learn."""
    while True:
        kind = rng.random()
        if kind < 0.35:
            spec = None
        elif kind < 0.55:
            spec = SceneSpec(held=(str(rng.choice(HOLDABLE)),))
        elif kind < 0.7:
            spec = SceneSpec(not_held=(str(rng.choice(HOLDABLE)),))
        elif kind < 0.82:
            spec = SceneSpec(near=(NEAR_PAIRS[int(rng.integers(len(NEAR_PAIRS)))],))
        elif kind < 0.92:
            spec = SceneSpec(far=(NEAR_PAIRS[int(rng.integers(len(NEAR_PAIRS)))],))
        else:
            spec = SceneSpec(extra=0)  # empty or nearly empty scenes
        try:
            return generate_scene(rng, spec, TRAIN_CORRELATIONS)
        except SceneError:
            continue


def sample_query(scene: Scene, rng: np.random.Generator, compound: bool = True) -> Query:
    kind = rng.random()
    present = sorted(scene.concepts)
    if kind < 0.45:
        concept = str(rng.choice(present)) if present and rng.random() < 0.5 else str(rng.choice(CONCEPTS))
        return Query("present", (concept,))
    if kind < 0.7:
        loose = [c for c in present if c in HOLDABLE]
        concept = str(rng.choice(loose)) if loose and rng.random() < 0.6 else str(rng.choice(HOLDABLE))
        return Query("holding", (concept,))
    if kind < 0.82:
        pairs = [p for p in NEAR_PAIRS if set(p) <= scene.concepts]
        first, second = pairs[int(rng.integers(len(pairs)))] if pairs and rng.random() < 0.7 else NEAR_PAIRS[int(rng.integers(len(NEAR_PAIRS)))]
        return Query("near", (second, first) if rng.random() < 0.3 else (first, second))
    if kind < 0.88 or not compound:
        return Query("dangerous")
    parts = tuple(sample_query(scene, rng, compound=False) for _ in range(int(rng.integers(2, 4))))
    return Query("all" if rng.random() < 0.5 else "any", parts=parts)


def reasoning_words(query: Query, scene: Scene) -> list[str]:
    """The step-by-step answer the VLM learns to write: what it sees, then the conclusion."""

    def seen(concept: str) -> list[str]:
        return [concept, "visible"] if concept in scene.concepts else ["no", concept, "visible"]

    if query.kind == "present":
        steps = seen(query.concepts[0])
    elif query.kind == "holding":
        concept = query.concepts[0]
        steps = seen("person") + ["."] + seen(concept)
        if {"person", concept} <= scene.concepts:
            steps += [".", concept, "in", "hand"] if query.holds(scene) else [".", concept, "not", "in", "hand"]
    elif query.kind == "near":
        first, second = query.concepts
        steps = seen(first) + ["."] + seen(second)
        if {first, second} <= scene.concepts:
            steps += [".", first, "near", second] if query.holds(scene) else [".", first, "far", "from", second]
    else:
        hazards = [c for c in HAZARDS if c in scene.concepts]
        steps = ["dangerous", hazards[0], "visible"] if hazards else ["nothing", "dangerous", "visible"]
    return [*steps, ".", "answer", "yes" if query.holds(scene) else "no", "<eos>"]


def vlm_batch(rng: np.random.Generator, tokenizer: ToyTokenizer, images: int, questions: int, no_image: float, reason: float):
    scenes = [training_scene(rng) for _ in range(images)]
    vocab = tokenizer.vocab
    rows, targets, image_index, present = [], [], [], []
    for index, scene in enumerate(scenes):
        for _ in range(questions):
            query = sample_query(scene, rng)
            ids = tokenizer.encode(statement_text(query, rng))
            reasoning = query.kind not in ("all", "any") and rng.random() < reason
            without_image = not reasoning and rng.random() < no_image
            answer = ["yes" if query.holds(scene) else "no"]
            if reasoning:
                answer = reasoning_words(query, scene)
            prompt = [vocab["<reason>" if reasoning else "<ask>"], *ids, vocab["<q>"]]
            sequence = prompt + [vocab[w] for w in answer]
            # Next-token targets only on the answer part: the model is never taught to write statements.
            target = [-100] * (len(prompt) - 1) + [vocab[w] for w in answer] + [-100]
            rows.append(sequence[:MAX_TEXT])
            targets.append(target[:MAX_TEXT])
            image_index.append(index)
            present.append(0.0 if without_image else 1.0)
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), vocab["<pad>"], dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(r)], labels[i, : len(t)] = r, t
    aux = np.array([[float(_aux_label(s, name)) for name in AUX_LABELS] for s in scenes], dtype=np.float32)
    return (
        torch.from_numpy(model_input([s.image for s in scenes])),
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        torch.tensor(image_index),
        torch.tensor(present).unsqueeze(1),
        torch.from_numpy(aux),
    )


def _aux_label(scene: Scene, name: str) -> bool:
    parts = name.split(":")
    if len(parts) == 1:
        return name in scene.concepts
    if parts[0] == "held":
        return parts[1] in scene.held()
    return scene.near(parts[1], parts[2]) or scene.near(parts[2], parts[1])


# ---------------------------------------------------------------- models


def conv_stem(channels: tuple[int, ...]) -> nn.Sequential:
    """Stride-2 convolutions (96 -> 96 / 2**len(channels)); after the first, each gets a 3x3 refinement.

    No refinement at the first, largest resolution: it would cost more than the rest of the model."""
    layers: list[nn.Module] = []
    previous = 3
    for stage, width in enumerate(channels):
        layers += [nn.Conv2d(previous, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU()]
        if stage:
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
        previous = width
    return nn.Sequential(*layers)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, bias: torch.Tensor | None,
                context_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x, with the context's (visual) keys and values in front when given.

        context_rows maps each row of x to its context row, so that training computes the visual keys
        once per image rather than once per question; exported graphs pass one context row per x row."""
        q = self.split(self.q(x))
        k, v = (self.split(t) for t in self.kv(x).chunk(2, dim=-1))
        if context is not None:
            ck, cv = (self.split(t) for t in self.kv(context).chunk(2, dim=-1))
            if context_rows is not None:
                ck, cv = ck[context_rows], cv[context_rows]
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        weights = (q @ k.transpose(-1, -2)) * self.scale
        if bias is not None:
            weights = weights + bias
        out = (weights.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return self.out(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                context_rows: torch.Tensor | None = None):
        x = x + self.attention(self.norm1(x), context, bias, context_rows)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Image -> 36 visual tokens (6x6 grid) of width DIM."""

    def __init__(self):
        super().__init__()
        self.stem = conv_stem((32, 64, 96, DIM))
        self.position = nn.Parameter(torch.randn(VISUAL_GRID * VISUAL_GRID, DIM) * 0.02)
        self.block = Block(DIM, HEADS)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(image).flatten(2).transpose(1, 2) + self.position
        return self.norm(self.block(tokens))


class TextDecoder(nn.Module):
    """Causal decoder over words whose every layer also attends to the visual tokens (prefix).

    image_present 0 swaps the visual tokens for a learned "no image" block: the language prior path.
    """

    def __init__(self, vocab_size: int, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, DIM)
        self.position = nn.Parameter(torch.randn(MAX_TEXT, DIM) * 0.02)
        self.no_image = nn.Parameter(torch.randn(VISUAL_GRID * VISUAL_GRID, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block(DIM, HEADS) for _ in range(layers))
        self.context_norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, vocab_size)

    def forward(self, visual: torch.Tensor, image_present: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """visual [B, 36, DIM] (one row per sequence), image_present [B, 1], ids [B, L] -> logits [B, L, V]."""
        gate = image_present.unsqueeze(-1)
        return self.decode(gate * visual + (1 - gate) * self.no_image, ids)

    def train_forward(self, visual: torch.Tensor, image_index: torch.Tensor, image_present: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
        """The same function with visual [images, 36, DIM] shared by several sequences: the no-image block
        becomes one more 'image' row, so the visual keys are computed once per image."""
        contexts = torch.cat([visual, self.no_image.unsqueeze(0)], dim=0)
        rows = torch.where(image_present[:, 0] > 0.5, image_index, torch.full_like(image_index, visual.shape[0]))
        return self.decode(contexts, ids, rows)

    def decode(self, contexts: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        length = ids.shape[1]
        x = self.embed(ids) + self.position[:length]
        causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        bias = torch.cat([torch.zeros(length, contexts.shape[1]), causal], dim=1)
        for block, norm in zip(self.blocks, self.context_norms):
            x = block(x, norm(contexts), bias, rows)
        return self.head(self.norm(x))


class ToyVLM(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vision = VisionEncoder()
        self.decoder = TextDecoder(vocab_size)
        self.aux = nn.Linear(DIM, len(AUX_LABELS))  # training only: what made the tiny VLM learn


class ToyCLIP(nn.Module):
    """Dual encoder: a small CNN for images, a bag of word embeddings + MLP for texts."""

    def __init__(self, vocab_size: int, dim: int = 128):
        super().__init__()
        self.image_stem = conv_stem((24, 48, 96, 128))
        self.image_proj = nn.Linear(128, dim)
        self.embed = nn.Embedding(vocab_size, 128, padding_idx=0)
        self.text_mlp = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, dim))
        self.scale, self.bias = nn.Parameter(torch.tensor(10.0)), nn.Parameter(torch.tensor(-5.0))

    def embed_images(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_stem(image).mean(dim=(2, 3))), dim=-1)

    def embed_texts(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).float().unsqueeze(-1)
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.text_mlp(pooled), dim=-1)


class ToyDetector(nn.Module):
    """Per-concept masks on a 24x24 grid (stride 4); boxes are read off the masks."""

    def __init__(self):
        super().__init__()
        self.down = conv_stem((32, 64, 96))  # 96 -> 12
        self.up = nn.Sequential(nn.ConvTranspose2d(96, 64, 2, 2), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(),
                                nn.Conv2d(64, len(CONCEPTS), 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.down(image)))


# ---------------------------------------------------------------- training


def _schedule(optimizer, step: int, steps: int, peak: float) -> None:
    warm = max(1, steps // 20)
    lr = peak * min(1.0, (step + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, step / steps)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vlm(steps: int, seed: int) -> dict:
    vocab = demo_vocabulary()
    tokenizer = ToyTokenizer(vocab)
    model = ToyVLM(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    started = time.time()
    for step in range(steps):
        images, ids, labels, image_index, present, aux = vlm_batch(rng, tokenizer, 32, 5, no_image=0.1, reason=0.15)
        _schedule(optimizer, step, steps, 1e-3)
        visual = model.vision(images)
        logits = model.decoder.train_forward(visual, image_index, present, ids)
        # Every sequence weighs the same: a long step-by-step answer must not drown the one-token answers.
        token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        answered = (labels != -100).float()
        loss = ((token_loss * answered).sum(1) / answered.sum(1)).mean()
        # Max-pooled: one token showing an object is enough for "present". Measured on 150-step vision-only
        # runs, max pooling and a peak lr of 1e-3 learned fastest (aux loss 0.23 vs 0.25 mean-pooled, 0.28 at 3e-3).
        aux_loss = F.binary_cross_entropy_with_logits(model.aux(visual.max(1).values), aux)
        optimizer.zero_grad()
        (loss + 2.0 * aux_loss).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vlm step {step}/{steps} loss {loss.item():.4f} aux {aux_loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    OUT.mkdir(parents=True, exist_ok=True)
    sample_images, sample_ids, _, index, present, _ = vlm_batch(np.random.default_rng(0), tokenizer, 2, 2, 0.0, 0.0)
    with torch.no_grad():
        visual = model.vision(sample_images)
    _export(model.vision, (sample_images,), OUT / "vlm_vision.onnx", ["image"], ["visual"],
            {"image": {0: "batch"}, "visual": {0: "batch"}})
    _export(model.decoder, (visual[index], present, sample_ids), OUT / "vlm_decoder.onnx",
            ["visual", "image_present", "ids"], ["logits"],
            {"visual": {0: "batch"}, "image_present": {0: "batch"}, "ids": {0: "batch", 1: "length"},
             "logits": {0: "batch", 1: "length"}})
    return {"parameters": sum(p.numel() for p in model.parameters() if p is not model.aux.weight and p is not model.aux.bias)}


def clip_batch(rng: np.random.Generator, tokenizer: ToyTokenizer, size: int):
    scenes = [training_scene(rng) for _ in range(size)]
    captions, caption_concepts = [], []
    for scene in scenes:
        present = sorted(scene.concepts)
        count = int(rng.integers(1, 4))
        chosen = list(rng.choice(present, size=min(count, len(present)), replace=False)) if present and rng.random() < 0.7 else []
        while len(chosen) < count:
            chosen.append(str(rng.choice(CONCEPTS)))
        chosen = list(dict.fromkeys(str(c) for c in chosen))
        text = " and ".join(statement_text(Query("present", (c,)), rng) for c in chosen)
        captions.append(tokenizer.encode(text))
        caption_concepts.append(set(chosen))
    width = max(len(c) for c in captions)
    ids = np.zeros((size, width), dtype=np.int64)
    for i, c in enumerate(captions):
        ids[i, : len(c)] = c
    # Soft match: the share of the caption's objects that the image shows.
    target = np.array([[len(c & s.concepts) / len(c) for c in caption_concepts] for s in scenes], dtype=np.float32)
    return torch.from_numpy(model_input([s.image for s in scenes])), torch.from_numpy(ids), torch.from_numpy(target)


class ExportImages(nn.Module):
    def __init__(self, model: ToyCLIP):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.embed_images(image)


class ExportTexts(nn.Module):
    def __init__(self, model: ToyCLIP):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model.embed_texts(ids)


def train_clip(steps: int, seed: int) -> dict:
    vocab = demo_vocabulary()
    tokenizer = ToyTokenizer(vocab)
    assert vocab["<pad>"] == 0, "the text encoder treats id 0 as padding"
    model = ToyCLIP(len(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    started = time.time()
    for step in range(steps):
        images, ids, target = clip_batch(rng, tokenizer, 48)
        _schedule(optimizer, step, steps, 2e-3)
        logits = model.scale * model.embed_images(images) @ model.embed_texts(ids).T + model.bias
        loss = F.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"clip step {step}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    images, ids, _ = clip_batch(np.random.default_rng(0), tokenizer, 2)
    _export(ExportImages(model), (images,), OUT / "clip_image.onnx", ["image"], ["embedding"],
            {"image": {0: "batch"}, "embedding": {0: "batch"}})
    _export(ExportTexts(model), (ids,), OUT / "clip_text.onnx", ["ids"], ["embedding"],
            {"ids": {0: "batch", 1: "length"}, "embedding": {0: "batch"}})
    return {"parameters": sum(p.numel() for p in model.parameters())}


def detector_batch(rng: np.random.Generator, size: int):
    """Targets: the grid cells (stride 4) under each object's tight box. Box-shaped rather than pixel masks,
    so that thin objects (a knife) get as many positive cells as their box has, and boxes read off cleanly."""
    scenes = [training_scene(rng) for _ in range(size)]
    grid = SCENE_SIZE // 4
    masks = np.zeros((size, len(CONCEPTS), grid, grid), dtype=np.float32)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            masks[i, CONCEPTS.index(obj.concept), top // 4:-(-bottom // 4), left // 4:-(-right // 4)] = 1.0
    return torch.from_numpy(model_input([s.image for s in scenes])), torch.from_numpy(masks)


def train_detector(steps: int, seed: int) -> dict:
    model = ToyDetector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    started = time.time()
    for step in range(steps):
        images, masks = detector_batch(rng, 32)
        _schedule(optimizer, step, steps, 2e-3)
        # Positive cells are rare (a small object covers ~1 % of one channel): weigh them up.
        loss = F.binary_cross_entropy(model(images), masks, weight=1.0 + 9.0 * masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"detector step {step}/{steps} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
    model.eval()
    images, _ = detector_batch(np.random.default_rng(0), 2)
    _export(model, (images,), OUT / "detector.onnx", ["image"], ["masks"], {"image": {0: "batch"}, "masks": {0: "batch"}})
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    module.eval()
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


TRAINERS = {"vlm": (train_vlm, 1700), "clip": (train_clip, 1200), "detector": (train_detector, 1000)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(TRAINERS))
    parser.add_argument("--steps", type=int, help="default: the committed models' step count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    trainer, default_steps = TRAINERS[args.model]
    steps = args.steps or default_steps
    started = time.time()
    info = trainer(steps, args.seed)
    record = {"model": args.model, "steps": steps, "seed": args.seed, "train_seconds": round(time.time() - started),
              "torch": torch.__version__, **info}
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[args.model] = record
    manifest["vocabulary"] = demo_vocabulary()
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(json.dumps(record), file=sys.stderr)


if __name__ == "__main__":
    main()
