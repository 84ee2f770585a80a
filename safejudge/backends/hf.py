"""Hugging Face vision-language models (Qwen2-VL, Qwen2.5-VL, Idefics3/SmolVLM) as the CLUE MLLM.

One-token scoring shares work across questions: the prompt prefix common to every question (system
turn, the image, the start of the user turn) is prefilled once, and all question suffixes then run packed
in one row after that KV cache. `score_batch` (a merged round of the served stage, safejudge/merging.py) puts several
images' rows side by side in one forward. The result equals a full forward of each prompt
(tests/test_hf_backend.py checks to 1e-5 in fp32).

Prefix reuse across calls: the prefilled prefix (the image through the vision tower and the decoder, plus
the text around it) is kept in a small LRU, keyed by the image's pixel digest and the prefix's token ids.
A later `score` on the same image (the next wave of the "waves" schedule) starts from it; `reason` starts
its generation from it too (the cache cut back to the end of the image, then extended by the reasoning
question's opening), so an image is encoded once per judgement, not once per call. Entries are never
mutated (users deep-copy them). Memory: `prefix_cache_size` entries (default 4: the image's scoring and
reasoning prefixes plus Strategy 2 views) of prefix-length x layers x 2 x kv-heads x head-dim values each,
about 8 MiB per entry for Qwen2-VL-2B in bf16 with a 448x448 image (256 image tokens); 0 disables it.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Idefics3Processor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from safejudge.backends.base import MLLMStats
from safejudge.decision import yes_no_token_ids, yes_probability
from safejudge.fingerprint import hf_fingerprint
from safejudge.images import conform, pixel_digest
from safejudge.prompts import chat_messages, reasoning_turns, yes_no_question

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _without_video(processor_class: type) -> type:
    """The Qwen processor minus its video processor, which needs torchvision (not installable here):
    `Qwen2VLProcessor(video_processor=None)` fails with `VIDEO_PROCESSOR_MAPPING has no attribute
    '_extra_content'`. Sub-processors are read from the __init__ signature, so this one loads only
    the image processor and the tokenizer. It keeps the original class name, which save_pretrained
    writes to processor_config.json, so saved directories still load with AutoProcessor elsewhere."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template)

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__})


Qwen2VLImageOnlyProcessor = _without_video(Qwen2VLProcessor)
Qwen2_5_VLImageOnlyProcessor = _without_video(Qwen2_5_VLProcessor)

# config.model_type -> the processor class that loads without torchvision
PROCESSORS: dict[str, type] = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "idefics3": Idefics3Processor,
}

# config.model_type -> the largest long/short side ratio its image processor takes. Qwen2(.5)-VL's
# smart_resize raises "absolute aspect ratio must be smaller than 200" above 200 (transformers 5.24); it
# scales small images up to its min_pixels itself, so any side of 1 or more is fine. Idefics3 resizes any
# size and shape (sides at least 1) and is not listed.
MAX_ASPECT: dict[str, float] = {"qwen2_vl": 200, "qwen2_5_vl": 200}

# Processor outputs that carry one value per token (sliced with the prompt), as opposed to image tensors.
_TOKEN_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids")
TOKEN_MEMO_SIZE = 4096  # memoised prompts and their tokens: a few constitutions' statements, with and without image


@dataclass(frozen=True)
class _Prefix:
    """A prefilled prompt prefix: its cache (never mutated: deep-copy before use), expanded token ids, and the
    position of the token after it (M-RoPE: not the token count)."""

    cache: object
    ids: tuple[int, ...]
    next_position: int
    image_end: int  # the index after its last image token (0 without an image): it cannot be cut before

    @property
    def rope_delta(self) -> int:
        return self.next_position - len(self.ids)


def _image_digest(image: Image.Image | None) -> str:
    return "none" if image is None else pixel_digest(image).hex()


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(s) for s in sequences]))  # any sequences, not only strings


def _stacked_cache(caches: Sequence[DynamicCache], length: int) -> DynamicCache:
    """One batch-row per cache (each of batch size 1), left-padded with zeros to `length` positions."""
    layers = []
    for index in range(len(caches[0].layers)):
        keys, values = [], []
        for cache in caches:
            layer = cache.layers[index]
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"scoring on a cached prefix needs full-attention cache layers, got {type(layer).__name__}")
            padding = (0, 0, length - layer.keys.shape[-2], 0)
            keys.append(torch.nn.functional.pad(layer.keys, padding))
            values.append(torch.nn.functional.pad(layer.values, padding))
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(layers)


class HFVisionLanguageModel:
    """The MLLM protocol (safejudge/backends/base.py) for a transformers image-text-to-text model."""

    # The engine's default schedule on this backend (JudgeOptions.schedule None). "waves" asks only what can
    # still change the verdict, and with the prefix LRU a later wave costs its questions' tokens plus one
    # forward pass, never the image again: measured 1.5-4x faster than "all" when rules fail at their first
    # item, about 5 % slower when nothing fails (benchmarks/RESULTS.md, "Schedules").
    preferred_schedule = "waves"

    def __init__(
        self,
        model,
        processor,
        model_id: str,
        fingerprint: str,
        max_new_tokens: int = 128,
        max_pack_tokens: int = 4096,
        prefix_cache_size: int = 4,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.max_new_tokens = max_new_tokens
        self.max_pack_tokens = max_pack_tokens
        self.yes_ids, self.no_ids = yes_no_token_ids(self.tokenizer.get_vocab())
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        # Qwen2-VL places image tokens on a 2-D M-RoPE grid; text after the image continues from the grid's
        # largest position, not from the token count, so reused caches need these positions explicitly.
        self._rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
        self.max_aspect = MAX_ASPECT.get(model.config.model_type)
        self.stats = MLLMStats()
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], _Prefix] = OrderedDict()
        self._prefix_lock = threading.Lock()
        image_token = getattr(processor, "image_token", None)
        candidates = (getattr(processor, "image_token_id", None), image_token and self.tokenizer.convert_tokens_to_ids(image_token))
        self._image_token_ids = {i for i in candidates if isinstance(i, int)}
        self._openings: dict[tuple[str, bool], int] = {}
        # A constitution's prompts recur on every image, an image's encoded prefix on every call about it:
        # both are memoised (bounded) so that a later wave or Strategy 2 call skips the tokenizer and the
        # image processor (28 % of the served MLLM's time before; benchmarks/RESULTS.md "Served path").
        self._yes_no_prompt = functools.lru_cache(maxsize=TOKEN_MEMO_SIZE)(
            lambda image, statement: self._render(image, [yes_no_question(statement)])
        )
        self._token_memo: OrderedDict[str, list[int]] = OrderedDict()
        self._encoded: OrderedDict[tuple[str, tuple[int, ...]], dict] = OrderedDict()

    def forget_images(self) -> None:
        """Drop every cached image prefix (benchmarks start each judgement cold)."""
        with self._prefix_lock:
            self._prefixes.clear()
            self._encoded.clear()

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        dtype: Literal["float32", "bfloat16"] = "float32",
        threads: int | None = None,
        max_new_tokens: int = 128,
        max_pack_tokens: int = 4096,
        model_id: str | None = None,
        device: str | None = None,
        prefix_cache_size: int = 4,
    ) -> HFVisionLanguageModel:
        """Load by hub id or local directory. threads sets torch's (process-wide) intra-op thread count;
        max_pack_tokens bounds the question tokens packed into one forward (the mask grows with its square);
        device: where every tensor lives (default CUDA when present, else the CPU). On a GPU use bfloat16."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if threads is not None:
            torch.set_num_threads(threads)
        source = str(source)
        config = AutoConfig.from_pretrained(source)
        processor_class = PROCESSORS.get(config.model_type, AutoProcessor)
        processor = processor_class.from_pretrained(source)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # SDPA: fused attention on CUDA, and it takes the packed scoring's boolean block mask.
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation="sdpa"
        ).to(device).eval()
        return cls(
            model,
            processor,
            model_id=model_id or source,
            fingerprint=hf_fingerprint(source),
            max_new_tokens=max_new_tokens,
            max_pack_tokens=max_pack_tokens,
            prefix_cache_size=prefix_cache_size,
        )

    # -- prompts ---------------------------------------------------------------------------------------

    def _render(self, image: bool, turns: Sequence[str], answers: Sequence[str] = ()) -> str:
        """The chat-template text of the conversation, ending where the model answers."""
        return self.processor.apply_chat_template(
            chat_messages(turns, image, answers), tokenize=False, add_generation_prompt=True
        )

    def yes_no_prompt(self, image: bool, statement: str) -> str:
        """The full one-token scoring prompt for one statement (public so tests can run it plainly)."""
        return self._yes_no_prompt(image, statement)

    # -- scoring ---------------------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], image: Image.Image | None):
        if image is None:
            return self.tokenizer(list(texts), return_tensors="pt", padding=True).to(self.device)
        image = conform(image, max_aspect=self.max_aspect)
        inputs = self.processor(text=list(texts), images=[image] * len(texts), return_tensors="pt", padding=True)
        return inputs.to(self.device)

    def _opening_length(self, kind: str, image: bool) -> int:
        """Plain tokens every prompt of this kind shares whatever the statement: the canonical prefix cut, so
        that calls with different questions about one image find the same cached prefix."""
        key = (kind, image)
        if key not in self._openings:
            render = self.yes_no_prompt if kind == "yes_no" else lambda img, s: self._render(img, reasoning_turns(s)[:1])
            probes = [self.tokenizer(render(image, statement)).input_ids for statement in ("alpha", "zulu")]
            self._openings[key] = _common_prefix_length(probes)
        return self._openings[key]

    def _shared_prefix(
        self, prompts: Sequence[str], image: Image.Image | None, digest: str, cap: int | None = None
    ) -> tuple[dict, list[list[int]]]:
        """Model inputs for the prompt prefix all prompts share (at most cap plain tokens), and each prompt's
        remaining token ids.

        Prompts are compared as plain token ids (image placeholder not yet expanded); the processor then
        encodes the first prompt with the image once, and the prefix is cut after the expanded image.
        The placeholder is a special token, so text around it tokenizes the same either way (checked).
        """
        plain = self._token_ids(prompts)
        # At least one token per prompt stays out of the prefix: its logits are the answer.
        shared = min(_common_prefix_length(plain), min(len(p) for p in plain) - 1)
        if cap is not None:
            shared = min(shared, cap)
        key = (digest, tuple(plain[0][:shared]))
        with self._prefix_lock:
            prefix = self._encoded.get(key)
            if prefix is not None:
                self._encoded.move_to_end(key)
        if prefix is None:
            first = self._encode(prompts[:1], image)
            expansion = first["input_ids"].shape[1] - len(plain[0])
            cut = shared + expansion
            if first["input_ids"][0, cut:].tolist() != plain[0][shared:]:
                raise RuntimeError("the processor changed text tokens around the image; shared-prefix scoring is unsafe")
            prefix = {key: (value[:, :cut] if key in _TOKEN_ALIGNED else value) for key, value in first.items()}
            self._remember(self._encoded, key, prefix, max(1, self.prefix_cache_size))
        return prefix, [p[shared:] for p in plain]

    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain token ids of each text (image placeholders unexpanded); the texts not memoised yet are
        tokenized in one call."""
        with self._prefix_lock:
            known = {text: self._token_memo.get(text) for text in texts}
        missing = [text for text, ids in known.items() if ids is None]
        if missing:
            for text, ids in zip(missing, self.tokenizer(missing).input_ids, strict=True):
                known[text] = ids
                self._remember(self._token_memo, text, ids, TOKEN_MEMO_SIZE)
        return [known[text] for text in texts]

    def _remember(self, memo: OrderedDict, key, value, size: int) -> None:
        with self._prefix_lock:
            memo[key] = value
            memo.move_to_end(key)
            while len(memo) > size:
                memo.popitem(last=False)

    def _prefill(self, prefix: dict) -> tuple[object, int]:
        """Run the prefix once; returns its cache and the position of the token after it."""
        length = prefix["input_ids"].shape[1]
        position_ids, next_position = None, length
        if self._rope_index is not None and "image_grid_thw" in prefix:
            position_ids, deltas = self._rope_index(
                prefix["input_ids"],
                mm_token_type_ids=prefix["mm_token_type_ids"],
                image_grid_thw=prefix["image_grid_thw"],
                attention_mask=prefix["attention_mask"],
            )
            next_position = length + int(deltas[0, 0])
        output = self.model(**prefix, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        self.stats.forward_passes += 1
        self.stats.tokens_processed += length
        self.stats.prefix_prefills += 1
        if "pixel_values" in prefix:
            self.stats.vision_encodings += 1
        return output.cache, next_position

    def _image_end(self, ids: Sequence[int]) -> int:
        ends = [i + 1 for i, token in enumerate(ids) if token in self._image_token_ids]
        return ends[-1] if ends else 0

    def _prefix(self, prefix: dict, image: Image.Image | None, digest: str) -> _Prefix:
        """The prefilled prefix, from the LRU where it (or a prefix of it that reaches past the image) is."""
        ids = tuple(prefix["input_ids"][0].tolist())
        image_end = self._image_end(ids) if image is not None else 0
        base, shared = None, 0
        with self._prefix_lock:
            found = self._prefixes.get((digest, ids))
            if found is not None:
                self._prefixes.move_to_end((digest, ids))
                self.stats.prefix_hits += 1
                return found
            # Else the cached prefix of this image sharing the most tokens with this one, the image included.
            for (entry_digest, _), entry in self._prefixes.items():
                if entry_digest == digest:
                    common = _common_prefix_length([entry.ids, ids])
                    if common > shared and common >= max(image_end, entry.image_end, 1):
                        base, shared = entry, common
        if base is None:
            cache, next_position = self._prefill(prefix)
            made = _Prefix(cache, ids, next_position, image_end)
        else:
            # Cut the cached prefix back to what it shares (the image stays whole), then run the rest.
            self.stats.prefix_hits += 1
            cache = copy.deepcopy(base.cache)
            if len(base.ids) > shared:
                cache.crop(-(len(base.ids) - shared))
            rest = ids[shared:]
            if rest:
                self.model(
                    input_ids=torch.tensor(rest, device=self.device)[None],
                    attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self.device),
                    position_ids=(shared + base.rope_delta + torch.arange(len(rest), device=self.device))[None],
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self.stats.forward_passes += 1
                self.stats.tokens_processed += len(rest)
            made = _Prefix(cache, ids, len(ids) + base.rope_delta, image_end)
        if self.prefix_cache_size > 0:
            self._remember(self._prefixes, (digest, ids), made, self.prefix_cache_size)
        return made

    def _rows_logits(self, rows: Sequence[tuple[_Prefix, list[list[int]]]]) -> list[torch.Tensor]:
        """Last-token logits of each suffix of each row, every row in ONE batched forward: a row is one
        prefix's cache and a pack of suffixes placed one after another.

        A block-diagonal causal mask lets each suffix see its row's prefix and itself only, and each suffix's
        positions restart right after its prefix, so every suffix computes exactly what it would alone: no
        per-question copy of the cache. Rows of different images sit side by side: shorter prefixes are
        left-padded in the stacked cache and shorter packs right-padded, the padding masked out.
        """
        device = self.device
        width = max(sum(map(len, pack)) for _, pack in rows)
        longest = max(len(prefix.ids) for prefix, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        allowed = torch.zeros((len(rows), width, longest + width), dtype=torch.bool, device=device)
        ends: list[list[int]] = []
        for row, (prefix, pack) in enumerate(rows):
            # Every query, padding included, sees the row's prefix (so none has nothing to attend to).
            allowed[row, :, longest - len(prefix.ids) : longest] = True
            start, row_ends = 0, []
            for suffix in pack:
                n = len(suffix)
                input_ids[row, start : start + n] = torch.tensor(suffix, device=device)
                position_ids[row, start : start + n] = prefix.next_position + torch.arange(n, device=device)
                allowed[row, start : start + n, longest + start : longest + start + n] = torch.tril(
                    torch.ones((n, n), dtype=torch.bool, device=device)
                )
                start += n
                row_ends.append(start - 1)
            ends.append(row_ends)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=allowed[:, None],
            position_ids=position_ids,
            # The packed tokens are appended to a new cache; the prefixes stay clean.
            cache=_stacked_cache([prefix.cache for prefix, _ in rows], longest),
            use_cache=True,
        ).logits
        self.stats.forward_passes += 1
        self.stats.tokens_processed += sum(len(suffix) for _, pack in rows for suffix in pack)
        return [logits[row, row_ends] for row, row_ends in enumerate(ends)]

    def _packs(self, things: Sequence[T], size: Callable[[T], int] = len) -> list[list[T]]:
        """Consecutive groups of at most max_pack_tokens tokens each (bounds the mask's memory): suffixes into
        the packs of one row, rows into the groups of one forward."""
        packs: list[list[T]] = [[]]
        for thing in things:
            if packs[-1] and sum(map(size, packs[-1])) + size(thing) > self.max_pack_tokens:
                packs.append([])
            packs[-1].append(thing)
        return [pack for pack in packs if pack]

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        """M = P(Yes)/(P(Yes)+P(No)) per precondition statement; the image (or none) is prefilled once, and
        not again by later calls on the same image while its prefix is in the LRU."""
        return self.score_batch([(image, questions)])[0]

    def score_batch(self, items: Sequence[tuple[Image.Image | None, Sequence[str]]]) -> list[np.ndarray]:
        """`score` for several images (or none) at once, one array per item: each item's prefix is prefilled
        (or found in the LRU) on its own, then the questions of all items run in one batched forward (a row
        per item and pack of questions), so a merged mllm batch costs one decoder pass, not one per request."""
        rows: list[tuple[int, _Prefix, list[list[int]]]] = []
        with torch.inference_mode():
            for index, (image, questions) in enumerate(items):
                if not questions:
                    continue
                prompts = [self.yes_no_prompt(image is not None, statement) for statement in questions]
                digest = _image_digest(image)
                prefix, suffixes = self._shared_prefix(
                    prompts, image, digest, self._opening_length("yes_no", image is not None)
                )
                cached = self._prefix(prefix, image, digest)
                rows += [(index, cached, pack) for pack in self._packs(suffixes)]
            logits = [
                row_logits
                for group in self._packs(rows, size=lambda row: sum(map(len, row[2])))
                for row_logits in self._rows_logits([(cached, pack) for _, cached, pack in group])
            ]
        per_item: list[list[torch.Tensor]] = [[] for _ in items]
        for (index, _, _), row_logits in zip(rows, logits, strict=True):
            per_item[index].append(row_logits)
        return [
            yes_probability(torch.cat(parts).float().cpu().numpy(), self.yes_ids, self.no_ids)
            if parts else np.zeros(0, dtype=np.float64)
            for parts in per_item
        ]

    def minimum_tokens(self, image: Image.Image | None, questions: Sequence[str]) -> int:
        """The least any scorer must run for these questions: the shared prefix once plus each
        question's own tokens (the yardstick for `tokens_processed`)."""
        if not questions:
            return 0
        prompts = [self.yes_no_prompt(image is not None, statement) for statement in questions]
        prefix, suffixes = self._shared_prefix(
            prompts, image, _image_digest(image), self._opening_length("yes_no", image is not None)
        )
        return prefix["input_ids"].shape[1] + sum(len(s) for s in suffixes)

    # -- reasoning -------------------------------------------------------------------------------------

    def _generate(self, image: Image.Image, prompts: list[str]) -> list[str]:
        """Greedy generation for each prompt, batched. With the prefix LRU on, it starts from the image's
        cached prefix (system + image + the reasoning question's opening): the batch is that prefix, then
        each prompt's rest left-padded, so only the rest and the new tokens run through the decoder."""
        if self.prefix_cache_size <= 0:
            inputs = self._encode(prompts, image)
            self.stats.tokens_processed += inputs["input_ids"].numel()
            self.stats.prefix_prefills += 1
            self.stats.vision_encodings += 1  # the image once per call (the processor repeats it per prompt)
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.pad_id
            )
            return self._decoded(output[:, inputs["input_ids"].shape[1] :])
        digest = _image_digest(image)
        prefix, suffixes = self._shared_prefix(prompts, image, digest, self._opening_length("reason", True))
        cached = self._prefix(prefix, image, digest)
        width = max(len(s) for s in suffixes)
        rows = [[self.pad_id] * (width - len(s)) + s for s in suffixes]
        device = self.device
        input_ids = torch.cat(
            [torch.tensor(cached.ids, device=device)[None].expand(len(rows), -1), torch.tensor(rows, device=device)],
            dim=1,
        )
        attention_mask = torch.cat(
            [torch.ones((len(rows), len(cached.ids)), dtype=torch.long, device=device),
             torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)],
            dim=1,
        )
        cache = copy.deepcopy(cached.cache)
        cache.batch_repeat_interleave(len(rows))
        if self._rope_index is not None:
            # Qwen2-VL keeps the last image's M-RoPE offset as model state and adds it to the text positions
            # of a continued generation: make it this prefix's.
            self.model.model.rope_deltas = torch.tensor([[cached.rope_delta]], device=device)
        self.stats.tokens_processed += len(rows) * width
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        return self._decoded(output[:, input_ids.shape[1] :])

    def _decoded(self, new_tokens: torch.Tensor) -> list[str]:
        self.stats.forward_passes += new_tokens.shape[1]
        self.stats.tokens_generated += int((new_tokens != self.pad_id).sum())
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """Two greedy turns per statement, batched: think step by step, then summarise as JSON."""
        if not questions:
            return []
        turns = [reasoning_turns(statement) for statement in questions]
        with torch.inference_mode():
            thoughts = self._generate(image, [self._render(True, turn[:1]) for turn in turns])
            return self._generate(
                image, [self._render(True, turn, [thought]) for turn, thought in zip(turns, thoughts, strict=True)]
            )
