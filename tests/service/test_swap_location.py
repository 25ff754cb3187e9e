"""The registry swap's refusals (`_swap_to`): a version stored under another name, a contract change.

A valid bundle of tiny/3 copied by hand into models/tiny/2 passes every check of its own files, so only the
location check (`_load(..., expect="tiny/2")`) stands between `activate("tiny", "2")` and serving tiny/3
under the name tiny/2. The refused swap changes nothing.
"""

from __future__ import annotations

import shutil

import pytest

from oodguard.service.bundle import BundleError
from oodguard.service.registry import ModelRegistry
from oodguard.service.settings import Settings

from .bundle_factory import make_tiny_bundle


def test_activate_refuses_a_bundle_stored_under_another_version(tmp_path):
    one = make_tiny_bundle(tmp_path / "src-1", "tiny", "1", logit_scale=5.0)
    three = make_tiny_bundle(tmp_path / "src-3", "tiny", "3", logit_scale=15.0)
    reg = ModelRegistry(Settings(bundle=one, models_dir=tmp_path / "models", max_batch=4))
    reg.load_initial()
    try:
        shutil.copytree(three, tmp_path / "models" / "tiny" / "2")
        with pytest.raises(BundleError) as err:
            reg.activate("tiny", "2")
        assert err.value.check == "location"
        assert "the manifest says tiny/3 but the bundle is stored as tiny/2" in str(err.value)
        assert reg.active.version == "1" and not reg.active.released
    finally:
        reg.close()


def test_activate_refuses_a_contract_change_and_names_every_change(tmp_path):
    """Without allow_contract_change, a version with other classes and another score is refused; the error names
    both changes and the way to accept them, and the old version keeps serving."""
    one = make_tiny_bundle(tmp_path / "src-1", "tiny", "1")
    two = make_tiny_bundle(tmp_path / "src-2", "tiny", "2", classes=("cyan", "magenta", "yellow"), score="energy")
    reg = ModelRegistry(Settings(bundle=one, models_dir=tmp_path / "models", max_batch=4))
    reg.load_initial()
    try:
        reg.register_path(two, trusted=True)
        with pytest.raises(BundleError) as err:
            reg.activate("tiny", "2")
        assert err.value.check == "contract"
        assert str(err.value).endswith(
            "tiny/2 changes the client contract (classes, score); pass allow_contract_change to accept it")
        assert reg.active.version == "1"
        # the refusal is in the models dir's event log, with where it went and why
        failed = [e for e in reg.store.read_state().events if e["action"] == "activate_failed"]
        assert [(e["to"], e["reason"]) for e in failed] == [("tiny/2", str(err.value))]
        result = reg.activate("tiny", "2", allow_contract_change=True)
        assert reg.active.version == "2"
        assert result.checks[-2:] == ["warm", "contract"]  # the checks it passed, the contract check last
    finally:
        reg.close()


def test_a_refusal_that_cannot_be_logged_is_still_the_refusal(tmp_path):
    """Recording the failed swap is best effort: a store that cannot write its event log does not replace the
    refusal's own error."""
    one = make_tiny_bundle(tmp_path / "src-1", "tiny", "1")
    three = make_tiny_bundle(tmp_path / "src-3", "tiny", "3")
    reg = ModelRegistry(Settings(bundle=one, models_dir=tmp_path / "models", max_batch=4))
    reg.load_initial()
    try:
        shutil.copytree(three, tmp_path / "models" / "tiny" / "2")

        def broken(*args, **kwargs):
            raise OSError("no space left on device")

        reg.store.record_event = broken
        with pytest.raises(BundleError) as err:
            reg.activate("tiny", "2")
        assert err.value.check == "location" and reg.active.version == "1"
    finally:
        reg.close()


def test_a_swap_reports_what_it_did_and_becomes_the_last_swap(tmp_path):
    one = make_tiny_bundle(tmp_path / "src-1", "tiny", "1")
    two = make_tiny_bundle(tmp_path / "src-2", "tiny", "2")
    reg = ModelRegistry(Settings(bundle=one, models_dir=tmp_path / "models", max_batch=4))
    reg.load_initial()
    try:
        reg.register_path(two, trusted=True)
        result = reg.activate("tiny", "2")
        assert (result.action, result.result) == ("activate", "success")
        assert (result.previous["version"], result.current["version"]) == ("1", "2")
        assert reg.last_swap is result  # what the admin API reports as the last swap
        back = reg.rollback()
        assert (back.action, back.result) == ("rollback", "success")
        assert (back.previous["version"], back.current["version"]) == ("2", "1")
        assert reg.last_swap is back
    finally:
        reg.close()


def test_a_first_activation_has_no_previous_version(tmp_path):
    """Activating on a registry that serves nothing yet (nothing loaded): `previous` is None, not a crash."""
    one = make_tiny_bundle(tmp_path / "src-1", "tiny", "1")
    reg = ModelRegistry(Settings(models_dir=tmp_path / "models", max_batch=4))
    try:
        reg.register_path(one, trusted=True)
        result = reg.activate("tiny", "1")
        assert result.previous is None and result.current["version"] == "1" and reg.active.version == "1"
    finally:
        reg.close()
