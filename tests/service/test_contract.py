"""Which bundle changes need explicit consent (--allow-contract-change) on a hot-swap."""

from __future__ import annotations

from oodguard.service.loaded_model import contract_diff
from oodguard.service.manifest import load_manifest


def test_added_outputs_are_compatible_removed_or_renamed_are_not(tiny_bundle):
    old = load_manifest(tiny_bundle)
    assert contract_diff(old, old) == {}
    more = old.model_copy(update={"outputs": [*old.outputs, "mahalanobis"]})
    assert contract_diff(old, more) == {}  # a retrained bundle that also exports mahalanobis
    fewer = old.model_copy(update={"outputs": [o for o in old.outputs if o != "energy"] or old.outputs[:-1]})
    assert "outputs" in contract_diff(old, fewer)
    renamed = old.model_copy(update={"outputs": [o if o != "probs" else "probabilities" for o in old.outputs]})
    assert "outputs" in contract_diff(old, renamed)


def test_classes_input_and_score_changes_need_consent(tiny_bundle):
    old = load_manifest(tiny_bundle)
    assert "classes" in contract_diff(old, old.model_copy(update={"classes": [*old.classes[:-1], "other"]}))
    assert "input" in contract_diff(old, old.model_copy(update={"input": old.input.model_copy(update={"height": 64})}))
    assert "score" in contract_diff(old, old.model_copy(update={"score": old.score.model_copy(update={"name": "x"})}))
