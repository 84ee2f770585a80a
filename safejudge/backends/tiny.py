"""Tiny random-weight models of the real architecture classes, built in code and cached on disk.

No model hub is reachable here, so tests, the server's stages and benchmarks exercise the real loading
and inference code on these: real classes (Qwen2-VL, Idefics3, CLIP, OWLv2), real processors, a
byte-level BPE tokenizer trained in code. Weights are random but deterministic by seed, and every process
loads the same files from disk. They say nothing about accuracy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safejudge.fingerprint import cache_root
from safejudge.prompts import REASON_STEP, REASON_SUMMARY, SYSTEM, YES_NO

TINY_VERSION = 3
SEED = 0
# Wide init spreads yes/no answers over (0, 1) and makes the image matter; the default 0.02 puts every
# answer near 0.58, which no test could tell from a broken pipeline.
INITIALIZER_RANGE = 0.5
VOCAB_SIZE = 600

_ANSWER_WORDS = ["Yes", "No", " Yes", " No", "yes", "no"]

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The Qwen2-VL chat template reduced to system/user/assistant turns with image and text parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IDEFICS3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
]
# SmolVLM's template: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% elif message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% if message['content'] is not string %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# "<unk>" takes id 0 because OWLv2 treats a query whose first token is 0 as padding.
CLIP_SPECIAL_TOKENS = ["<unk>", "<|startoftext|>", "<|endoftext|>"]


def cache_dir() -> Path:
    """Where tiny models live: $SAFEJUDGE_CACHE/tiny, default ~/.cache/safejudge/tiny."""
    return cache_root() / "tiny"


def _constitution_texts() -> list[str]:
    """The shipped constitutions as plain text (a realistic vocabulary for the full-size stand-in)."""
    from safejudge.shipped import CONSTITUTIONS

    directory = CONSTITUTIONS
    return [path.read_text(encoding="utf-8") for path in sorted(directory.glob("*.yaml"))]


def _training_text() -> list[str]:
    """What the tiny tokenizers learn from: the project's own prompts, so they tokenize compactly."""
    words = (
        "person people animal animals blood injury fire body bed water shower kiss mouth knife gun weapon "
        "visible image photo picture true false rating rationale the a an of in on is are with and or not "
        "red green blue yellow circle square triangle shape cat dog car tree house sky grass naked"
    )
    texts = [SYSTEM, YES_NO, REASON_STEP, REASON_SUMMARY, words, '{"rating": "Yes", "rationale": "It is."}']
    # Repeated so that BPE merges every answer spelling into one token.
    texts += _ANSWER_WORDS * 200
    return texts


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int = VOCAB_SIZE, extra_texts: list[str] = ()):
    """A byte-level BPE trained in code; raises if an answer word did not become one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text() + list(extra_texts), trainer=trainer)
    for word in _ANSWER_WORDS:
        if len(tokenizer.encode(word).ids) != 1:
            raise RuntimeError(f"tiny tokenizer did not learn {word!r} as a single token")
    return tokenizer


def _fast_tokenizer(
    special_tokens: list[str], chat_template: str | None, vocab_size: int = VOCAB_SIZE, extra_texts=(), **kwargs
):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(special_tokens, vocab_size, list(extra_texts)),
        padding_side="left",
        chat_template=chat_template,
        **kwargs,
    )


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# Qwen2-VL sizes: the test-sized one, and Qwen2-VL-2B/7B-Instruct's published dimensions (random weights:
# an honest stand-in for speed and memory, never for accuracy).
QWEN2_VL_SIZES: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3], vocab_size=None, max_position_embeddings=2048),
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        initializer_range=INITIALIZER_RANGE,
        # 56x56 to 112x112 pixels: 4 to 16 image tokens, so a test forward takes milliseconds.
        pixels=(56 * 56, 112 * 112),
        tokenizer=dict(),
    ),
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24], vocab_size=151936,
                  max_position_embeddings=32768),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        initializer_range=0.02,  # the real init: wide init overflows at this depth
        # Up to 1024x1024 pixels: 448x448 gives 256 image tokens, as in the measured reference.
        pixels=(56 * 56, 1024 * 1024),
        # Whole English words as tokens, as a real 150k-token vocabulary has them: question lengths in
        # tokens then match the real model's, which is what the benchmark's costs depend on.
        tokenizer=dict(vocab_size=8000, corpus=_constitution_texts),
    ),
    # Qwen2-VL-7B-Instruct's published config.json: 8.3B parameters, about 33 GB on disk in float32.
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064,
                  max_position_embeddings=32768),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        initializer_range=0.02,
        pixels=(56 * 56, 1024 * 1024),
        tokenizer=dict(vocab_size=8000, corpus=_constitution_texts),
    ),
}


def qwen2_vl_config(size: str, tokenizer):
    """The Qwen2VLConfig of one of QWEN2_VL_SIZES, its special tokens taken from `tokenizer`."""
    from transformers import Qwen2VLConfig

    dims = QWEN2_VL_SIZES[size]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(dims["text"])
    mrope_section = text.pop("mrope_section")
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)
    return Qwen2VLConfig(
        text_config=dict(
            **text,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            initializer_range=dims["initializer_range"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            **dims["vision"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=dims["initializer_range"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _build_qwen2_vl(out: Path, seed: int, size: str = "tiny") -> None:
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from safejudge.backends.hf import Qwen2VLImageOnlyProcessor

    dims = QWEN2_VL_SIZES[size]
    tokenizer_settings = dict(dims["tokenizer"])
    corpus = tokenizer_settings.pop("corpus", None)
    tokenizer = _fast_tokenizer(
        QWEN_SPECIAL_TOKENS,
        QWEN_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_texts=corpus() if corpus else (),
        **tokenizer_settings,
    )
    config = qwen2_vl_config(size, tokenizer)
    _seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    min_pixels, max_pixels = dims["pixels"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_idefics3(out: Path, seed: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = _fast_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, IDEFICS3_CHAT_TEMPLATE, eos_token="<end_of_utterance>", pad_token="<|endoftext|>"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in IDEFICS3_SPECIAL_TOKENS}
    image_size, patch_size, scale_factor = 64, 16, 2
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=INITIALIZER_RANGE,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            initializer_range=INITIALIZER_RANGE,
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<image>"],
        scale_factor=scale_factor,
        pad_token_id=ids["<|endoftext|>"],
    )
    _seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _clip_tokenizer(max_length: int):
    """CLIP's text convention: every text is wrapped as <bos> text <eos>, and the model pools at <eos>."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = train_bpe_tokenizer(CLIP_SPECIAL_TOKENS)
    bos, eos = backend.token_to_id("<|startoftext|>"), backend.token_to_id("<|endoftext|>")
    backend.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )


def _build_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _clip_tokenizer(max_length=32)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        initializer_factor=1.0,
    )
    _seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)


def _build_owlv2(out: Path, seed: int) -> None:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tokenizer = _clip_tokenizer(max_length=16)
    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=32,  # OWLv2's class head compares text embeddings at the text width
        # At full scale random box heads saturate (every box a corner or the whole image); at 0.1 boxes stay
        # near OWLv2's patch-grid priors and scores spread around 0.5.
        initializer_factor=0.1,
    )
    _seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    model.save_pretrained(out)


TINY_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "qwen2-vl": _build_qwen2_vl,
    "qwen2-vl-2b-shape": lambda out, seed: _build_qwen2_vl(out, seed, size="2b"),
    "qwen2-vl-7b-shape": lambda out, seed: _build_qwen2_vl(out, seed, size="7b"),
    "idefics3": _build_idefics3,
    "clip": _build_clip,
    "owlv2": _build_owlv2,
}


def _check_name(name: str) -> None:
    if name not in TINY_BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_BUILDERS)}")


def build_tiny_model(name: str, out: Path, seed: int = SEED) -> Path:
    """Build one tiny model into `out` (which must not exist yet); the same seed gives the same files."""
    _check_name(name)
    TINY_BUILDERS[name](out, seed)
    return out


def publish_atomically(target: Path, build: Callable[[Path], object]) -> Path:
    """Run build(tmp_dir) next to target and rename it into place; a concurrent winner is kept.

    Every process that needs the directory can race here: each builds privately and the first rename
    wins, so nobody ever reads a half-written model.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp / "model")
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_model(name: str) -> Path:
    """The directory of tiny model `name` (a key of TINY_BUILDERS), built on first use."""
    _check_name(name)
    return publish_atomically(cache_dir() / f"{name}-v{TINY_VERSION}", lambda out: build_tiny_model(name, out))


def ensure_tiny_clip_onnx() -> Path:
    """The tiny CLIP exported to ONNX (what "tiny:clip" serves with OnnxClipEncoder), exported on first use."""
    from safejudge.backends.clip_onnx import export_clip

    return publish_atomically(
        cache_dir() / f"clip-onnx-v{TINY_VERSION}", lambda out: export_clip(ensure_tiny_model("clip"), out)
    )
