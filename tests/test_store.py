"""Compiled-constitution files, the cache key, and the hot-reloading ConstitutionStore."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from safejudge import fingerprint, prompts
from safejudge.backends import registry
from safejudge.backends.base import Models
from safejudge.backends.onnx_demo import DEMO_MODELS
from safejudge.backends.registry import ModelSpec, load_mllm, load_relevance
from safejudge.cli import app
from safejudge.compiled import compile_constitution
from safejudge.constitution import load_constitution, parse_constitution
from safejudge.store import (
    SETTLE_S,
    CompiledFileError,
    ConstitutionCompiling,
    ConstitutionStore,
    UnknownConstitution,
    cache_key,
    cache_path,
    compile_cached,
    load_compiled,
    save_compiled,
)
from tests.fakes import ScriptedMLLM, ScriptedRelevance
from tests.files import rewrite_one_byte

STATEMENTS = {"A person is visible.": 0.31, "An animal is visible.": 0.22, "Visible blood.": 0.07, "Fire.": 0.12}
SLOW = "Slow blood."  # a statement only the "slow" constitution asks about


def constitution_yaml(name: str = "demo", version: int = 1, blood: str = "Visible blood.") -> str:
    return f"""\
name: {name}
version: {version}
rules:
  - id: injury
    title: Bloody injury
    category: violence
    text: A person or an animal with a visible bloody injury.
    preconditions:
      - ["A person is visible.", "An animal is visible."]
      - {blood}
  - id: fire
    title: On fire
    category: violence
    text: A person on fire.
    preconditions: ["A person is visible.", "Fire."]
"""


CONSTITUTIONS = Path(__file__).resolve().parent.parent / "constitutions"
RULE_TEXTS = ["A person or an animal with a visible bloody injury.", "A person on fire."]


def scripted_models(
    mllm_id: str = "scripted-mllm",
    relevance_id: str | None = "scripted-clip",
    mllm_fingerprint: str = "sha256:mllm",
    relevance_fingerprint: str = "sha256:clip",
    mllm: type[ScriptedMLLM] = ScriptedMLLM,
    **mllm_fields,
) -> Models:
    scripted = mllm(
        image=Image.new("RGB", (4, 4)),
        with_image={},
        prior={**STATEMENTS, SLOW: 0.5},
        model_id=mllm_id,
        fingerprint=mllm_fingerprint,
        **mllm_fields,
    )
    relevance = None
    if relevance_id is not None:
        vectors = {text: np.eye(3, dtype=np.float32)[i] for i, text in enumerate(RULE_TEXTS)}
        relevance = ScriptedRelevance(
            texts=vectors, image_vector=np.ones(3, np.float32), model_id=relevance_id, fingerprint=relevance_fingerprint
        )
    return Models(mllm=scripted, relevance=relevance)


SECOND = 1_000_000_000


def write(path: Path, text: str) -> Path:
    """Write a file the store reads at once: its mtime lies past the settle period, and differs from the
    previous version's, so a rewrite within one clock tick is still seen as a change."""
    previous = path.stat().st_mtime_ns if path.exists() else time.time_ns()
    path.write_text(text)
    mtime = min(time.time_ns() - 10 * SECOND, previous - SECOND)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    compiled = compile_constitution(parse_constitution(constitution_yaml()), scripted_models())
    path = save_compiled(compiled, tmp_path / "demo.npz")

    loaded = load_compiled(path)

    assert loaded.constitution == compiled.constitution
    assert loaded.priors == compiled.priors == {text: pytest.approx(p) for text, p in STATEMENTS.items()}
    assert (loaded.mllm_id, loaded.relevance_id) == ("scripted-mllm", "scripted-clip")
    assert (loaded.mllm_fingerprint, loaded.relevance_fingerprint) == ("sha256:mllm", "sha256:clip")
    np.testing.assert_array_equal(loaded.rule_embeddings, compiled.rule_embeddings)
    with np.load(path, allow_pickle=False) as data:  # plain arrays only, nothing pickled
        assert set(data.files) == {"header", "rule_embeddings"}


def test_round_trip_without_relevance_encoder(tmp_path: Path) -> None:
    compiled = compile_constitution(parse_constitution(constitution_yaml()), scripted_models(relevance_id=None))
    loaded = load_compiled(save_compiled(compiled, tmp_path / "demo.npz"))
    assert loaded.rule_embeddings is None and loaded.relevance_id is None and loaded.relevance_fingerprint is None
    assert loaded.priors == compiled.priors


def test_unreadable_files_raise_compiled_file_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(CompiledFileError, match="garbage.npz"):
        load_compiled(garbage)

    compiled = compile_constitution(parse_constitution(constitution_yaml()), scripted_models())
    wrong_rows = tmp_path / "rows.npz"
    save_compiled(compiled, wrong_rows)
    with np.load(wrong_rows) as data:
        header = data["header"]
    np.savez(wrong_rows, header=header, rule_embeddings=np.zeros((5, 3), np.float32))
    with pytest.raises(CompiledFileError, match="5 rule embeddings for 2 enabled rules"):
        load_compiled(wrong_rows)


def test_cache_key_follows_content_model_ids_and_fingerprints() -> None:
    base, models = parse_constitution(constitution_yaml()), scripted_models()
    key = cache_key(base, models)
    # Formatting and comments do not change the content; the key stays.
    reformatted = parse_constitution("# a comment\n" + constitution_yaml().replace("  - id: fire", "\n  - id: fire"))
    assert cache_key(reformatted, models) == key
    assert cache_key(base, scripted_models()) == key  # the same models, loaded again
    assert cache_key(parse_constitution(constitution_yaml(blood="Visible blood on skin.")), models) != key
    assert cache_key(parse_constitution(constitution_yaml(version=2)), models) != key
    assert cache_key(base, scripted_models(mllm_id="other-mllm")) != key
    assert cache_key(base, scripted_models(relevance_id="other-clip")) != key
    assert cache_key(base, scripted_models(relevance_id=None)) != key
    # The same ids with other weights (retrained, re-exported, a new hub revision): another key.
    assert cache_key(base, scripted_models(mllm_fingerprint="sha256:retrained")) != key
    assert cache_key(base, scripted_models(relevance_fingerprint="sha256:re-exported")) != key


def test_cache_key_follows_the_prompt_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    constitution, models = parse_constitution(constitution_yaml()), scripted_models()
    key = cache_key(constitution, models)
    monkeypatch.setattr(prompts, "YES_NO", "Is this visible: {statement}? Yes or No.")
    assert cache_key(constitution, models) != key


def test_compile_cached_hits_the_cache_without_mllm_calls(tmp_path: Path) -> None:
    constitution = parse_constitution(constitution_yaml())
    first_models, second_models = scripted_models(), scripted_models()

    first, cached = compile_cached(constitution, first_models, tmp_path)
    assert not cached and len(first_models.mllm.score_calls) == 1
    second, cached = compile_cached(constitution, second_models, tmp_path)
    assert cached and second_models.mllm.score_calls == []
    assert second.priors == first.priors

    _, cached = compile_cached(constitution, scripted_models(mllm_id="another-mllm"), tmp_path)
    assert not cached  # another model: its own priors
    assert len(list(tmp_path.glob("demo-*.npz"))) == 2


def test_a_corrupt_cache_file_is_recompiled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    constitution, models = parse_constitution(constitution_yaml()), scripted_models()
    cache_path(tmp_path, constitution, models).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="safejudge.store"):
        compiled, cached = compile_cached(constitution, models, tmp_path)
    assert not cached and compiled.priors["Fire."] == pytest.approx(0.12)
    assert "recompiling" in caplog.text
    assert load_compiled(cache_path(tmp_path, constitution, models)).priors == compiled.priors


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    constitutions = tmp_path / "constitutions"
    constitutions.mkdir()
    write(constitutions / "demo.yaml", constitution_yaml())
    return constitutions


def test_store_serves_by_name_and_uses_the_cache_across_instances(directory: Path, tmp_path: Path) -> None:
    models = scripted_models()
    store = ConstitutionStore(directory, models, tmp_path / "cache")
    assert store.names() == ["demo"]
    compiled = store.get("demo")
    assert compiled.constitution.name == "demo" and len(models.mllm.score_calls) == 1
    assert store.get("demo") is compiled  # memoised: no reload, no compile
    assert len(models.mllm.score_calls) == 1

    restarted_models = scripted_models()
    restarted = ConstitutionStore(directory, restarted_models, tmp_path / "cache")
    assert restarted.get("demo").priors == compiled.priors
    assert restarted_models.mllm.score_calls == []


def test_unknown_constitution_names_the_known_ones(directory: Path, tmp_path: Path) -> None:
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    write(directory / "broken.yaml", "name: broken\nrules: []\n")
    with pytest.raises(UnknownConstitution) as unknown:
        store.get("nope")
    assert isinstance(unknown.value, KeyError)
    assert str(unknown.value) == "unknown constitution 'nope'; known: demo (invalid files not served: broken.yaml)"


def test_edited_added_and_removed_files_are_picked_up_without_restart(directory: Path, tmp_path: Path) -> None:
    models = scripted_models()
    store = ConstitutionStore(directory, models, tmp_path / "cache")
    assert store.get("demo").constitution.version == "1"

    write(directory / "demo.yaml", constitution_yaml(version=2))
    assert store.get("demo").constitution.version == "2"
    assert len(models.mllm.score_calls) == 2  # the new content compiled once

    write(directory / "extra.yml", constitution_yaml(name="extra"))
    assert store.names() == ["demo", "extra"]
    assert store.get("extra").constitution.name == "extra"

    (directory / "demo.yaml").unlink()
    assert store.names() == ["extra"]
    with pytest.raises(UnknownConstitution, match="known: extra"):
        store.get("demo")


def test_an_invalid_edit_keeps_serving_the_last_good_version(
    directory: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    good = store.get("demo")

    with caplog.at_level(logging.ERROR, logger="safejudge.store"):
        write(directory / "demo.yaml", constitution_yaml().replace("category: violence", "category: [", 1))
        assert store.get("demo") is good
        store.get("demo")
    assert caplog.text.count("still serving its last good version") == 1  # logged once, not per call
    assert "demo.yaml:" in caplog.text  # the file:line message of the constitution loader

    write(directory / "demo.yaml", constitution_yaml(version=3))
    assert store.get("demo").constitution.version == "3"


def test_a_second_file_with_a_taken_name_is_not_served(directory: Path, tmp_path: Path) -> None:
    write(directory / "zz-copy.yaml", constitution_yaml(version=9))
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    assert store.names() == ["demo"]
    assert store.get("demo").constitution.version == "1"  # demo.yaml sorts first


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="constitution directory not found"):
        ConstitutionStore(tmp_path / "absent", scripted_models(), tmp_path / "cache")


@dataclass
class SlowMLLM(ScriptedMLLM):
    """Prior scoring (what compiling runs) holds until `release` is set, at most hold_s, when the batch asks
    about a statement in `slow` (None: every batch); the first `failures` prior scorings raise; each one
    appends a line to `log`, which counts compiles across processes."""

    slow: frozenset[str] | None = None
    hold_s: float = 0.0
    release: threading.Event = field(default_factory=threading.Event)
    failures: int = 0
    error: type[Exception] = RuntimeError
    log: Path | None = None
    priors_started: int = 0

    def score(self, image: Image.Image | None, questions) -> np.ndarray:
        if image is None:
            self.priors_started += 1
            if self.log is not None:
                with self.log.open("a") as handle:
                    handle.write(f"compiled by process {os.getpid()}\n")
            if self.slow is None or self.slow & set(questions):
                self.release.wait(self.hold_s)
            if self.failures:
                self.failures -= 1
                raise self.error("the MLLM call failed")
        return super().score(image, questions)


def slow_store(directory: Path, cache: Path, **fields) -> tuple[ConstitutionStore, SlowMLLM]:
    models = scripted_models(mllm=SlowMLLM, **fields)
    return ConstitutionStore(directory, models, cache), models.mllm


def wait_for_callers(mllm: SlowMLLM) -> None:
    """Until the held compile has started, and a while more: the callers' threads are waiting for it then."""
    deadline = time.monotonic() + 10
    while not mllm.priors_started and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)


def test_a_slow_compile_stalls_no_other_constitution(directory: Path, tmp_path: Path) -> None:
    write(directory / "slow.yaml", constitution_yaml(name="slow", blood=SLOW))
    store, mllm = slow_store(directory, tmp_path / "cache", slow=frozenset({SLOW}), hold_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(ConstitutionCompiling) as compiling:
            store.get("slow", timeout_s=0.2)
        assert str(compiling.value) == "constitution 'slow' is still compiling (0 s so far); retry shortly"
        assert 0.2 <= time.monotonic() - started < 2
        assert 0 < compiling.value.waited_s <= 0.2  # since the compile started, just after the call

        # Meanwhile another constitution compiles and is served at once, and the directory can be listed.
        started = time.monotonic()
        assert store.get("demo", timeout_s=5).constitution.name == "demo"
        assert store.get("demo", timeout_s=0).constitution.name == "demo"
        assert store.names() == ["demo", "slow"]
        assert time.monotonic() - started < 1
        with pytest.raises(ConstitutionCompiling):
            store.get("slow", timeout_s=0)
    finally:
        mllm.release.set()
    assert store.get("slow", timeout_s=5).constitution.name == "slow"
    assert mllm.priors_started == 2  # demo and slow once each: the compile its callers gave up on went on


def test_concurrent_callers_share_one_compile(directory: Path, tmp_path: Path) -> None:
    store, mllm = slow_store(directory, tmp_path / "cache", hold_s=30)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get("demo"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for_callers(mllm)
    assert mllm.priors_started == 1
    mllm.release.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert mllm.priors_started == 1


def test_a_failed_compile_reaches_every_waiter_and_is_retried(
    directory: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, mllm = slow_store(directory, tmp_path / "cache", hold_s=30, failures=1)
    errors = []

    def get() -> None:
        try:
            store.get("demo")
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=get) for _ in range(3)]
    with caplog.at_level(logging.ERROR, logger="safejudge.store"):
        for thread in threads:
            thread.start()
        wait_for_callers(mllm)
        mllm.release.set()
        for thread in threads:
            thread.join(10)
    assert errors == ["the MLLM call failed"] * 3
    assert "compiling constitution 'demo' failed (retried on its next request)" in caplog.text
    assert store.get("demo", timeout_s=5).priors["Fire."] == pytest.approx(0.12)
    assert mllm.priors_started == 2


def test_a_compile_that_times_out_itself_is_not_reported_as_still_compiling(directory: Path, tmp_path: Path) -> None:
    store, _ = slow_store(directory, tmp_path / "cache", failures=1, error=TimeoutError)  # e.g. a model call
    with pytest.raises(TimeoutError, match="the MLLM call failed"):
        store.get("demo", timeout_s=5)


def _get_in_a_process(directory: Path, cache: Path, log: Path, barrier) -> None:
    """One served judge process: its own store and models, the shared cache directory."""
    store, _ = slow_store(directory, cache, hold_s=0.5, log=log)
    barrier.wait(60)  # both miss the cache, then race to compile
    store.get("demo", timeout_s=60)


def test_processes_sharing_the_cache_compile_once(directory: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, log, cache = context.Barrier(2), tmp_path / "compiles.log", tmp_path / "cache"
    processes = [
        context.Process(target=_get_in_a_process, args=(directory, cache, log, barrier)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert len(log.read_text().splitlines()) == 1  # the other process loaded the file the first one saved
    assert len(list(cache.glob("demo-*.npz"))) == 1


def test_a_half_written_file_is_never_served(directory: Path, tmp_path: Path) -> None:
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    assert store.get("demo").constitution.version == "1"
    full = constitution_yaml(version=2)
    half = full[: full.index("  - id: fire")]
    assert len(parse_constitution(half).rules) == 1  # valid by itself: nothing but the settle period stops it

    path = directory / "demo.yaml"
    path.write_text(half)  # in place, as an editor or a slow copy writes
    served = [store.get("demo", timeout_s=0)]
    with path.open("a") as handle:
        handle.write(full[len(half) :])
    served.append(store.get("demo", timeout_s=0))
    assert [compiled.constitution.version for compiled in served] == ["1", "1"]  # the last good version

    time.sleep(SETTLE_S + 0.1)
    final = store.get("demo", timeout_s=5)
    assert final.constitution.version == "2" and len(final.rules) == 2


def test_a_name_in_a_file_still_being_written_is_waited_for(directory: Path, tmp_path: Path) -> None:
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    (directory / "extra.yaml").write_text(constitution_yaml(name="extra"))
    with pytest.raises(UnknownConstitution, match=r"\(files still being written, not read yet: extra.yaml\)$"):
        store.get("extra", timeout_s=0)

    started = time.monotonic()
    assert store.get("extra", timeout_s=5).constitution.name == "extra"  # instead of "unknown constitution"
    assert SETTLE_S * 0.5 < time.monotonic() - started < SETTLE_S + 1
    started = time.monotonic()
    with pytest.raises(UnknownConstitution, match="known: demo, extra$"):
        store.get("nope", timeout_s=5)  # nothing is being written: no wait
    assert time.monotonic() - started < 0.2


def test_a_file_with_an_mtime_in_the_future_is_read_once_settled(directory: Path, tmp_path: Path) -> None:
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    assert store.get("demo").constitution.version == "1"
    path = directory / "demo.yaml"
    path.write_text(constitution_yaml(version=2))
    in_an_hour = time.time_ns() + 3600 * SECOND  # a clock skewed against the file server's
    os.utime(path, ns=(in_an_hour, in_an_hour))
    assert store.get("demo", timeout_s=0).constitution.version == "1"
    time.sleep(SETTLE_S + 0.1)
    assert store.get("demo", timeout_s=5).constitution.version == "2"


def test_a_changed_model_file_under_the_same_spec_recompiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrained demo model in the same directory (same spec, same model ids) misses the cache; unchanged
    models hit it, and a restart with unchanged files hashes none of them again."""
    monkeypatch.setenv("SAFEJUDGE_CACHE", str(tmp_path / "safejudge-cache"))  # the digest memo
    hashed: list[str] = []
    real_sha256 = fingerprint._file_sha256
    monkeypatch.setattr(fingerprint, "_file_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    model_dir = Path(shutil.copytree(DEMO_MODELS, tmp_path / "demo-models"))  # mtimes kept: settled files
    spec = ModelSpec(mllm=f"demo:{model_dir}", relevance=f"demo:{model_dir}")
    constitution = load_constitution(CONSTITUTIONS / "toy-world.yaml")

    def compile_after_a_restart():
        return compile_cached(constitution, Models(mllm=load_mllm(spec), relevance=load_relevance(spec)), tmp_path)

    first, cached = compile_after_a_restart()
    assert not cached
    model_files = ["clip_image.onnx", "clip_text.onnx", "manifest.json", "vlm_decoder.onnx", "vlm_vision.onnx"]
    assert sorted(hashed) == model_files  # the manifest once, though both models include it

    hashed.clear()
    _, cached = compile_after_a_restart()
    assert cached and hashed == []

    decoder = model_dir / "vlm_decoder.onnx"
    rewrite_one_byte(decoder, decoder.stat().st_size // 2)  # one weight changed: "retrained"
    retrained, cached = compile_after_a_restart()
    assert not cached and hashed == ["vlm_decoder.onnx"]
    assert retrained.mllm_id == first.mllm_id and retrained.mllm_fingerprint != first.mllm_fingerprint
    assert retrained.relevance_fingerprint == first.relevance_fingerprint
    assert len(list(tmp_path.glob("toy-world-*.npz"))) == 2


# `safejudge build constitution`: the registry's loaders are replaced by the scripted models (no model hub).

runner = CliRunner()


@pytest.fixture
def scripted_registry(monkeypatch: pytest.MonkeyPatch) -> list[ModelSpec]:
    """Makes the registry hand out scripted models; records the specs it was asked for."""
    specs: list[ModelSpec] = []

    def load_mllm(spec: ModelSpec):
        specs.append(spec)
        return scripted_models(mllm_id=spec.mllm).mllm

    def load_relevance(spec: ModelSpec):
        return None if spec.relevance is None else scripted_models(relevance_id=spec.relevance).relevance

    monkeypatch.setattr(registry, "load_mllm", load_mllm)
    monkeypatch.setattr(registry, "load_relevance", load_relevance)
    return specs


def test_build_constitution_compiles_into_the_cache_the_store_reads(
    directory: Path, tmp_path: Path, scripted_registry: list[ModelSpec]
) -> None:
    cache = tmp_path / "cache"
    args = ["build", "constitution", str(directory / "demo.yaml"), "--mllm", "tiny:qwen2-vl", "--cache-dir", str(cache)]

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "demo v1, 4 statements, compiled in" in first.stdout
    assert scripted_registry[0].mllm == "tiny:qwen2-vl" and scripted_registry[0].relevance == "tiny:clip"
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "already cached" in second.stdout

    # The server's store, given models with the same ids, serves the built file without an MLLM call.
    models = scripted_models(mllm_id="tiny:qwen2-vl", relevance_id="tiny:clip")
    assert ConstitutionStore(directory, models, cache).get("demo").priors["Fire."] == pytest.approx(0.12)
    assert models.mllm.score_calls == []

    no_relevance = runner.invoke(app, [*args, "--relevance", "none"])
    assert no_relevance.exit_code == 0 and "compiled in" in no_relevance.stdout
    assert len(list(cache.glob("demo-*.npz"))) == 2


def test_build_constitution_errors_exit_2(directory: Path, tmp_path: Path, scripted_registry: list[ModelSpec]) -> None:
    write(directory / "broken.yaml", "name: broken\nversion: 1\nrules: []\n")
    broken = runner.invoke(app, ["build", "constitution", str(directory / "broken.yaml")])
    assert broken.exit_code == 2 and "broken.yaml:3: rules:" in broken.stderr

    bad_spec = runner.invoke(app, ["build", "constitution", str(directory / "demo.yaml"), "--mllm", "nope:x"])
    assert bad_spec.exit_code == 2
    assert bad_spec.stderr.startswith("error: invalid model spec: --mllm: unknown mllm scheme 'nope'")
    assert scripted_registry == []  # nothing was loaded


def test_a_calibration_for_this_constitution_and_model_sets_its_thresholds(
    directory: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safejudge.calibration import Calibration

    constitution = parse_constitution(constitution_yaml())
    fitted = dict(
        constitution="demo", constitution_hash=constitution.content_hash(), thresholds={"beta": 0.4},
        dev_seed=2, dev_images=10, dev_f1=0.9, dev_reasoning_calls_per_image=0.1, default_f1=0.8,
    )
    write(directory / "other-model.calibration.json",
          Calibration(model_id="another-mllm", **fitted).model_dump_json())
    store = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        assert store.get("demo").constitution.thresholds.beta == 0.6  # fitted for another model: ignored
    assert "calibration not applied" in caplog.text and "another-mllm" in caplog.text

    write(directory / "demo.calibration.json", Calibration(model_id="scripted-mllm", **fitted).model_dump_json())
    restarted = ConstitutionStore(directory, scripted_models(), tmp_path / "cache")
    calibrated = restarted.get("demo").constitution.thresholds
    assert calibrated.beta == 0.4 and calibrated.alpha2_factor == 0.8
