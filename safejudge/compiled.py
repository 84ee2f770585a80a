"""Compiled constitutions: what serving needs precomputed once per (constitution, models)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safejudge.backends.base import Models
from safejudge.constitution import Constitution, Rule


@dataclass(frozen=True)
class CompiledConstitution:
    """Priors M(None, c) for every precondition statement and the rules' text embeddings.

    The prior depends on the statement only, never on the image, so it is computed once here
    instead of once per image and precondition as in the paper's loop.
    """

    constitution: Constitution
    mllm_id: str
    mllm_fingerprint: str
    priors: dict[str, float]
    relevance_id: str | None = None
    relevance_fingerprint: str | None = None
    rule_embeddings: np.ndarray | None = None  # [len(constitution.enabled_rules), dim], L2-normalised

    @property
    def rules(self) -> list[Rule]:
        return self.constitution.enabled_rules


def all_statements(rules: list[Rule]) -> list[str]:
    return list(dict.fromkeys(text for rule in rules for text in rule.questions()))


def compile_constitution(constitution: Constitution, models: Models) -> CompiledConstitution:
    rules = constitution.enabled_rules
    statements = all_statements(rules)
    priors = models.mllm.score(None, statements)
    embeddings = None
    if models.relevance is not None:
        embeddings = np.asarray(models.relevance.embed_texts([rule.text for rule in rules]), dtype=np.float32)
    return CompiledConstitution(
        constitution=constitution,
        mllm_id=models.mllm.model_id,
        mllm_fingerprint=models.mllm.fingerprint,
        priors={text: float(p) for text, p in zip(statements, priors, strict=True)},
        relevance_id=models.relevance.model_id if models.relevance else None,
        relevance_fingerprint=models.relevance.fingerprint if models.relevance else None,
        rule_embeddings=embeddings,
    )
