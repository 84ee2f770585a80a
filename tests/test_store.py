"""Compiled-constitution files, the cache key, and the hot-reloading ConstitutionStore."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from safejudge import prompts
from safejudge.backends import registry
from safejudge.backends.base import Models
from safejudge.backends.registry import ModelSpec
from safejudge.cli import app
from safejudge.compiled import compile_constitution
from safejudge.constitution import parse_constitution
from safejudge.store import (
    CompiledFileError,
    ConstitutionStore,
    UnknownConstitution,
    cache_key,
    cache_path,
    compile_cached,
    load_compiled,
    save_compiled,
)
from tests.fakes import ScriptedMLLM, ScriptedRelevance

STATEMENTS = {"A person is visible.": 0.31, "An animal is visible.": 0.22, "Visible blood.": 0.07, "Fire.": 0.12}


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


RULE_TEXTS = ["A person or an animal with a visible bloody injury.", "A person on fire."]


def scripted_models(mllm_id: str = "scripted-mllm", relevance_id: str | None = "scripted-clip") -> Models:
    mllm = ScriptedMLLM(image=Image.new("RGB", (4, 4)), with_image={}, prior=dict(STATEMENTS), model_id=mllm_id)
    relevance = None
    if relevance_id is not None:
        vectors = {text: np.eye(3, dtype=np.float32)[i] for i, text in enumerate(RULE_TEXTS)}
        relevance = ScriptedRelevance(texts=vectors, image_vector=np.ones(3, np.float32), model_id=relevance_id)
    return Models(mllm=mllm, relevance=relevance)


def write(path: Path, text: str) -> Path:
    """Write and move the mtime forward, so a rewrite within one clock tick is still seen as a change."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    mtime = max(path.stat().st_mtime_ns, previous + 1_000_000_000)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    compiled = compile_constitution(parse_constitution(constitution_yaml()), scripted_models())
    path = save_compiled(compiled, tmp_path / "demo.npz")

    loaded = load_compiled(path)

    assert loaded.constitution == compiled.constitution
    assert loaded.priors == compiled.priors == {text: pytest.approx(p) for text, p in STATEMENTS.items()}
    assert (loaded.mllm_id, loaded.relevance_id) == ("scripted-mllm", "scripted-clip")
    np.testing.assert_array_equal(loaded.rule_embeddings, compiled.rule_embeddings)
    with np.load(path, allow_pickle=False) as data:  # plain arrays only, nothing pickled
        assert set(data.files) == {"header", "rule_embeddings"}


def test_round_trip_without_relevance_encoder(tmp_path: Path) -> None:
    compiled = compile_constitution(parse_constitution(constitution_yaml()), scripted_models(relevance_id=None))
    loaded = load_compiled(save_compiled(compiled, tmp_path / "demo.npz"))
    assert loaded.rule_embeddings is None and loaded.relevance_id is None
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


def test_cache_key_follows_content_and_model_ids() -> None:
    base = parse_constitution(constitution_yaml())
    key = cache_key(base, "m", "r")
    # Formatting and comments do not change the content; the key stays.
    reformatted = parse_constitution("# a comment\n" + constitution_yaml().replace("  - id: fire", "\n  - id: fire"))
    assert cache_key(reformatted, "m", "r") == key
    assert cache_key(parse_constitution(constitution_yaml(blood="Visible blood on skin.")), "m", "r") != key
    assert cache_key(parse_constitution(constitution_yaml(version=2)), "m", "r") != key
    assert cache_key(base, "other-mllm", "r") != key
    assert cache_key(base, "m", "other-clip") != key
    assert cache_key(base, "m", None) != key


def test_cache_key_follows_the_prompt_wording(monkeypatch: pytest.MonkeyPatch) -> None:
    constitution = parse_constitution(constitution_yaml())
    key = cache_key(constitution, "m", "r")
    monkeypatch.setattr(prompts, "YES_NO", "Is this visible: {statement}? Yes or No.")
    assert cache_key(constitution, "m", "r") != key


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


def test_concurrent_gets_compile_once(directory: Path, tmp_path: Path) -> None:
    models = scripted_models()
    store = ConstitutionStore(directory, models, tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.get("demo"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert len(models.mllm.score_calls) == 1


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
