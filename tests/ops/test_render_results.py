"""scripts/render_results.py: the tables of docs/results.md come from the eval JSON, cell by cell."""

from __future__ import annotations

import pytest

from ._scripts import load_script


def _module():
    return load_script("render_results")


def _metrics(auroc: float, fpr: float, n: int = 10) -> dict:
    return {"auroc": auroc, "fpr_at_95_tpr": fpr, "aupr_in": 0.5, "aupr_out": 0.25, "detection_error": 0.125,
            "n_in": n, "n_out": n}


def _eval(attack: str, base: float, n: int) -> dict:
    results = {score: {ood: {"none": _metrics(base, 0.1, n), attack: _metrics(base - 0.2 - i / 10, 0.5, n)}
                       for i, ood in enumerate(("tinyimagenet", "gaussian"))}
               for score in ("msp", "energy")}
    return {"attacks": ["none", attack], "accuracy": {"clean": 0.8, attack: {"msp": 0.7, "energy": 0.6}}, "results": results}


def test_summary_has_a_row_per_set_noise_apart_and_strong_comes_from_eval_strong():
    r = _module()
    data = {"runs": {"aloe": {"eval": _eval("paper", 0.9, 2000), "eval_strong": _eval("strong", 0.6, 500)},
                     "msp": {"eval": _eval("paper", 0.7, 2000)},  # no strong run: its cells are "–"
                     "pretrain": {"train_end": {}}}}
    summary = r.render_summary(data)
    assert "| aloe | tinyimagenet | 80.0 | 90.0 | 70.0 | 40.0 | 10.0 | 50.0 | 50.0 | 2000 | 2000 | 500 |" in summary
    assert "| msp | tinyimagenet | 80.0 | 70.0 | 50.0 | – |" in summary
    assert summary.index("Real OOD sets") < summary.index("| aloe | tinyimagenet") < summary.index("Synthetic noise") \
        < summary.index("| aloe | gaussian")
    assert "mean" not in summary.lower()
    assert "pretrain" not in summary
    full = r.render_full(data)
    assert "| gaussian | strong | 30.0 / 50.0 | – |" in full
    assert "| aloe | 80.0 | 70.0 / 60.0 | 70.0 / 60.0 |" in full
    long = r.render_long(data)
    assert "| msp | aloe | gaussian | strong | 500 / 500 | 30.0 | 50.0 | 50.0 | 25.0 | 12.5 |" in long
    assert long.count("\n") == 2 + 2 * (3 * 2 + 2 * 2)  # 2 header lines; per score: aloe 3 attacks x 2 sets, msp 2 x 2


def test_default_model_table_has_one_row_per_set_and_protocol_with_sample_sizes():
    mod = _module()
    m = lambda a, n: {**_metrics(a, 0.1, n), "n_in": n, "n_out": n}  # noqa: E731
    ev = {"accuracy": {"clean": 0.93}, "in_distribution": {"n": 2000},
          "ood_sets": {"tinyimagenet": {"source": "/d/tinyimagenet_test.npz"}, "gaussian": {"source": "synthetic:gaussian"}},
          "results": {"energy": {"tinyimagenet": {"none": m(0.99, 2000), "paper": m(0.95, 1000),
                                                  "paper_ood_only": m(0.97, 1000), "strong": m(0.2, 300)},
                                 "gaussian": {"none": m(1.0, 2000)}}}}
    forms = {f: {"tpr95": {"realised_tpr": 0.95, "fpr": {"tinyimagenet": 0.05}}, "n_in": 2000} for f in ("stored", "png")}
    bundle = {"validation": {"score": "energy", "forms": forms, "calibration_forms": ["stored", "png"]},
              "score_selection": {"in_distribution": "cal", "ood": "held-out", "rule": "lowest attacked FPR95",
                                  "chosen": "energy", "candidates": {n: {"clean": _metrics(0.9, 0.2), "attacked": _metrics(0.8, 0.3)}
                                                                     for n in ("msp", "energy")}}}
    md = mod.render_default({"recipe": {"methods": "aloe"}, "runs": {"aloe": {"eval": ev}}, "bundle_metrics": bundle})
    assert "| tinyimagenet | `paper` worst case, both sides | 1,000 + 1,000 | 95.0 |" in md
    assert "| tinyimagenet | `strong` worst case, both sides | 300 + 300 | 20.0 |" in md
    assert "| gaussian (synthetic) | clean | 2,000 + 2,000 | 100.0 |" in md
    assert md.index("tinyimagenet | clean") < md.index("gaussian (synthetic)")  # real sets first, noise apart
    assert "| png | – | 95.0 | 5.0 |" in md and "| energy (chosen) |" in md
    assert "(chosen by `--score auto`)" in md
    assert "mean" not in md.lower()  # no average over sets anywhere


def test_ood_side_only_rows_follow_their_attack_and_never_enter_the_accuracy_columns():
    """The ALOE / ATOM papers attack the OOD side only: those rows are shown next to the both-sides ones, labelled."""
    r = _module()
    ev = _eval("paper", 0.9, 1000)
    for per_set in ev["results"]["msp"].values():
        per_set["paper_ood_only"] = _metrics(0.85, 0.3, 1000)
    data = {"runs": {"aloe": {"eval": ev}}}
    full = r.render_full(data)
    rows = [line for line in full.splitlines() if line.startswith("| tinyimagenet |")]
    assert rows[:3] == ["| tinyimagenet | clean | 90.0 / 10.0 |", "| tinyimagenet | paper | 70.0 / 50.0 |",
                        "| tinyimagenet | paper (OOD only) | 85.0 / 30.0 |"]
    assert "| aloe | 80.0 | 70.0 / 60.0 |" in full  # accuracy: clean and the both-sides attack only
    assert "ood_only" not in full and "acc. under `paper_ood_only`" not in full
    assert "| aloe | tinyimagenet | 80.0 | 90.0 | 70.0 | 85.0 | 10.0 | 50.0 | 30.0 | 1000 | 1000 | 1000 |" in r.render_summary(data)


def test_default_model_table_names_each_forms_group_when_form_conditional():
    mod = _module()
    ev = {"accuracy": {"clean": 0.9}, "in_distribution": {"n": 10},
          "ood_sets": {"tinyimagenet": {"source": "/d/t.npz"}}, "results": {"energy": {"tinyimagenet": {"none": _metrics(0.9, 0.1)}}}}
    forms = {"jpeg_q30": {"tpr95": {"realised_tpr": 0.951, "fpr": {"tinyimagenet": 0.2}}, "group": "jpeg_q16_45"}}
    bundle = {"validation": {"score": "energy", "forms": forms, "calibration_forms": ["stored"], "form_conditional": True}}
    md = mod.render_default({"recipe": {"methods": "aloe"}, "runs": {"aloe": {"eval": ev}}, "bundle_metrics": bundle})
    assert "| jpeg_q30 | jpeg_q16_45 | 95.1 | 20.0 |" in md and "its upload-form group's threshold" in md
    assert "(named by `--score`)" in md  # no score_selection: the bundle's score was not chosen by --score auto


def test_summary_of_a_score_the_file_lacks_names_the_scores_it_has():
    r = _module()
    ev = _eval("paper", 0.9, 100)
    del ev["results"]["msp"]
    data = {"runs": {"aloe": {"eval": ev}}}
    with pytest.raises(SystemExit, match=r"no 'msp' results in this file; it has energy \(use --score\)"):
        r.render_summary(data, "msp")
    assert "| aloe | tinyimagenet | 80.0 | 90.0 |" in r.render_summary(data, "energy")
