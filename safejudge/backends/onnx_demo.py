"""The project's toy-world demo models behind the MLLM / RelevanceEncoder / Detector interfaces (ONNX Runtime).

TOY MODELS: trained by engine_build/train_demo.py on generated toy-world scenes (safejudge.toyworld) only.
They understand drawn icons on plain backgrounds and a few dozen words; they must never judge real photos.
They exist so that the whole CLUE pipeline runs, offline, with probabilities that mean something, and so
that its quality can be measured against exact ground truth.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from safejudge.backends.base import Detection, Models
from safejudge.decision import yes_no_token_ids, yes_probability
from safejudge.fingerprint import content_digest
from safejudge.toyworld import CONCEPTS, ToyTokenizer, ToyVocabularyError, model_input, words_of

DEMO_MODELS = Path(__file__).resolve().parent.parent / "demo_models"
TOY_WARNING = (
    "the demo models are toy models trained only on generated toy-world scenes; "
    "they must never be used to judge real photos"
)
MAX_ANSWER_WORDS = 24
MANIFEST = "manifest.json"


def _session(path: Path, threads: int) -> ort.InferenceSession:
    if not path.exists():
        raise FileNotFoundError(f"demo model {path} is missing; train it with engine_build/train_demo.py")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _sessions(directory: Path, names: Sequence[str], threads: int) -> list[ort.InferenceSession]:
    return [_session(directory / name, threads) for name in names]


def _fingerprint(directory: Path, names: Sequence[str]) -> str:
    """A model's ONNX files and the manifest (vocabulary, training record) they were trained with."""
    return content_digest([directory / MANIFEST, *(directory / name for name in names)])


def _vocabulary(directory: Path) -> dict[str, int]:
    manifest = directory / MANIFEST
    try:
        return {str(k): int(v) for k, v in json.loads(manifest.read_text())["vocabulary"].items()}
    except (OSError, KeyError, ValueError) as exc:
        raise FileNotFoundError(f"{manifest}: no readable vocabulary ({exc}); retrain the demo models") from exc


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [N, L] and each row's last real position (causal models ignore what follows)."""
    ids = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, np.array([len(r) - 1 for r in rows])


class DemoVLM:
    """The tiny VLM: image -> 36 visual tokens; a causal word decoder gives next-token logits.

    score() reads P(yes)/(P(yes)+P(no)) at the position after `<ask> statement <q>`; without an image the
    decoder gets its learned "no image" block instead of visual tokens (the language prior M(None, c)).
    reason() writes the model's short step-by-step answer after `<reason> statement <q>` greedily; it
    ends in `answer yes|no`, which becomes the JSON {"rating", "rationale"} the evaluators parse. The toy
    model has one reasoning mode instead of the paper's two chat turns: it cannot chat.
    """

    model_id = "toy-vlm-demo"
    FILES = ("vlm_vision.onnx", "vlm_decoder.onnx")

    def __init__(self, directory: Path = DEMO_MODELS, threads: int = 1):
        self.tokenizer = ToyTokenizer(_vocabulary(directory))
        self.vocab = self.tokenizer.vocab
        self.yes_ids, self.no_ids = yes_no_token_ids(self.vocab)
        self.vision, self.decoder = _sessions(directory, self.FILES, threads)
        self.fingerprint = _fingerprint(directory, self.FILES)

    def _visual(self, image: Image.Image | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
        if image is None:
            shape = self.decoder.get_inputs()[0].shape
            return np.zeros((rows, int(shape[1]), int(shape[2])), np.float32), np.zeros((rows, 1), np.float32)
        visual = self.vision.run(None, {"image": model_input([image])})[0]  # encoded once per image
        return np.repeat(visual, rows, axis=0), np.ones((rows, 1), np.float32)

    def _logits(self, visual: np.ndarray, present: np.ndarray, rows: list[list[int]]) -> np.ndarray:
        """Next-token logits [N, V] after each row's last token."""
        ids, last = _pad(rows, self.vocab["<pad>"])
        logits = self.decoder.run(None, {"visual": visual, "image_present": present, "ids": ids})[0]
        return logits[np.arange(len(rows)), last]

    def _prompts(self, mode: str, questions: Sequence[str]) -> list[list[int]]:
        return [[self.vocab[mode], *self.tokenizer.encode(q), self.vocab["<q>"]] for q in questions]

    def score(self, image: Image.Image | None, questions: Sequence[str]) -> np.ndarray:
        if not questions:
            return np.zeros(0)
        rows = self._prompts("<ask>", questions)
        visual, present = self._visual(image, len(rows))
        return yes_probability(self._logits(visual, present, rows), self.yes_ids, self.no_ids)

    def reason(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        if not questions:
            return []
        rows = self._prompts("<reason>", questions)
        answers: list[list[str]] = [[] for _ in rows]
        visual, present = self._visual(image, len(rows))
        open_rows = list(range(len(rows)))
        for _ in range(MAX_ANSWER_WORDS):
            if not open_rows:
                break
            nxt = self._logits(visual[open_rows], present[open_rows], [rows[i] for i in open_rows]).argmax(-1)
            still_open = []
            for i, token in zip(open_rows, nxt, strict=True):
                rows[i].append(int(token))
                word = self.tokenizer.words[int(token)]
                if word != "<eos>":
                    answers[i].append(word)
                    still_open.append(i)
            open_rows = still_open
        return [_as_json(words) for words in answers]


def _as_json(words: list[str]) -> str:
    """`... . answer yes` -> {"rating": "Yes", "rationale": "..."}; anything else is returned as written,
    and the evaluators' parser fails closed on it."""
    text = " ".join(words)
    if len(words) >= 2 and words[-2] == "answer" and words[-1] in ("yes", "no"):
        steps = " ".join(words[:-2]).replace(" .", ".").strip(" .")
        return json.dumps({"rating": words[-1].capitalize(), "rationale": f"{steps}." if steps else ""})
    return text


class DemoCLIP:
    """Toy dual encoder: a small CNN and a bag-of-words text encoder, L2-normalised 128-d embeddings."""

    model_id = "toy-clip-demo"
    FILES = ("clip_image.onnx", "clip_text.onnx")

    def __init__(self, directory: Path = DEMO_MODELS, threads: int = 1):
        self.tokenizer = ToyTokenizer(_vocabulary(directory))
        self.images, self.texts = _sessions(directory, self.FILES, threads)
        self.fingerprint = _fingerprint(directory, self.FILES)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.images.run(None, {"image": model_input(list(images))})[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        ids, _ = _pad([self.tokenizer.encode(t) for t in texts], self.tokenizer.vocab["<pad>"])
        return self.texts.run(None, {"ids": ids})[0]


class DemoDetector:
    """Toy detector: per-concept masks on a 24x24 grid; a word's box is the connected region of cells
    above MASK_THRESHOLD around its most confident cell, and its confidence that cell's probability."""

    model_id = "toy-detector-demo"
    MASK_THRESHOLD = 0.5
    FILES = ("detector.onnx",)

    def __init__(self, directory: Path = DEMO_MODELS, threads: int = 1):
        (self.session,) = _sessions(directory, self.FILES, threads)

    def detect(self, image: Image.Image, words: Sequence[str]) -> list[Detection | None]:
        channels = []
        for word in words:
            canonical = words_of(word)
            if len(canonical) != 1 or canonical[0] not in CONCEPTS:
                raise ToyVocabularyError(
                    f"central object {word!r} is not a toy-world object; the toy detector knows {', '.join(CONCEPTS)}"
                )
            channels.append(CONCEPTS.index(canonical[0]))
        masks = self.session.run(None, {"image": model_input([image])})[0][0]
        return [self._box(masks[c], image.size) for c in channels]

    def _box(self, mask: np.ndarray, size: tuple[int, int]) -> Detection | None:
        peak = np.unravel_index(int(mask.argmax()), mask.shape)
        confidence = float(mask[peak])
        if confidence <= 0.0:
            return None
        region = _connected(mask > min(self.MASK_THRESHOLD, confidence), peak)
        ys, xs = np.nonzero(region)
        cell_w, cell_h = size[0] / mask.shape[1], size[1] / mask.shape[0]
        box = (int(xs.min() * cell_w), int(ys.min() * cell_h), int(np.ceil((xs.max() + 1) * cell_w)),
               int(np.ceil((ys.max() + 1) * cell_h)))
        return Detection(box=box, confidence=confidence)


def _connected(above: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of `above` that contains seed (seed included even if below)."""
    region = np.zeros_like(above)
    region[seed] = True
    queue = deque([seed])
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < above.shape[0] and 0 <= nx < above.shape[1] and above[ny, nx] and not region[ny, nx]:
                region[ny, nx] = True
                queue.append((ny, nx))
    return region


def inexpressible(statements: Iterable[str], directory: Path = DEMO_MODELS) -> list[str]:
    """Why each statement that the demo vocabulary cannot express is refused (empty: all expressible)."""
    tokenizer = ToyTokenizer(_vocabulary(directory))
    problems = []
    for text in statements:
        try:
            tokenizer.encode(text)
        except ToyVocabularyError as exc:
            problems.append(str(exc))
    return problems


def load_demo_models(directory: Path = DEMO_MODELS, threads: int = 1, detector: bool = True) -> Models:
    """The three toy models (see TOY_WARNING). threads: ONNX Runtime intra-op threads per session."""
    return Models(
        mllm=DemoVLM(directory, threads),
        relevance=DemoCLIP(directory, threads),
        detector=DemoDetector(directory, threads) if detector else None,
    )


def demo_loader(role: str, argument: str, threads: int | None):
    """The registry's `demo:<argument>` scheme: `demo:toy` is the committed models, anything else a directory
    written by engine_build/train_demo.py."""
    directory = DEMO_MODELS if argument == "toy" else Path(argument).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"demo model directory {argument!r} does not exist; use demo:toy for the committed ones")
    model = {"mllm": DemoVLM, "relevance": DemoCLIP, "detector": DemoDetector}[role]
    return model(directory, threads or 1)
