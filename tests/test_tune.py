"""ser-tune end to end on tiny synthetic data: objectives, best.flags, resume, tuners, errors.

Every trial is a real (tiny, one-epoch) ser-train run, so the searches are few and small: a
random search on the robust objective with the baseline (interrupted, then resumed with a
larger --max_trials) that several tests read, a Hyperband trial on the mixed objective and
a random trial on the clean one.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

from ser_tf.data.corpora import write_manifest
from ser_tf.training import tuning
from trainers import train, tune

TINY_FLAGS = ["--corpus=manifest", "--protocol=speakers", "--test_speakers=s01",
              "--val_speakers=1", "--segment_s=0.5", "--n_mels=24", "--conv_filters=4,8",
              "--chunk_frames=12", "--chunk_hop=6", "--chunk_units=8", "--lstm_units=4",
              "--batch_size=8", "--epochs=1", "--patience=0"]
SEARCHED = ["--hparams=n_mels,conv_filters,dropout,learning_rate", "--space=n_mels=16|24|32",
            "--objective_attack=fgsm"]


@pytest.fixture(scope="module")
def manifest(synthetic_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(synthetic_corpus, path)
    return str(path)


def _parse(manifest, workdir, *extra) -> flags.FlagValues:
    fv = flags.FlagValues()
    tune.define_flags(fv)
    fv(["ser-tune", *TINY_FLAGS, f"--data_dir={manifest}", f"--workdir={workdir}", *extra])
    return fv


def _search(manifest, workdir, *extra) -> dict:
    return tune.prepare(_parse(manifest, workdir, *extra)).run()


def _check_best_flags(summary: dict, workdir) -> None:
    """best.flags is the best trial's: ser-train parses it as it is and gets those values."""
    completed = [t for t in summary["trials"] if "objective" in t]
    best = summary["best"]
    assert best["objective"] == max(t["objective"] for t in completed)
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["ser-train", f"--flagfile={workdir}/best.flags", f"--workdir={workdir}/retrain"])
    cfg = train.build_config(fv)
    assert best["hyperparameters"]
    for name, value in best["hyperparameters"].items():
        got = fv[name].value
        assert (",".join(got) if isinstance(got, list) else got) == value, name
    if "n_mels" in best["hyperparameters"]:
        assert cfg.model.n_mels == best["hyperparameters"]["n_mels"]
    # The base flags are kept: same corpus, split and tiny model otherwise.
    assert cfg.test_speakers == ("s01",) and cfg.model.lstm_units == 4
    # Exactly the flags the best trial trained with.
    with open(os.path.join(best["workdir"], "flags.txt")) as f:
        trial_flags = f.read().splitlines()
    with open(os.path.join(workdir, "best.flags")) as f:
        assert [ln for ln in f.read().splitlines() if not ln.startswith("#")] == trial_flags


def _mtime(*path) -> float:
    return os.stat(os.path.join(*path)).st_mtime_ns


@pytest.fixture(scope="module")
def robust_search(manifest, tmp_path_factory):
    """A random search on the robust objective with the baseline: interrupted while trial 0
    is being measured (after its training), re-run with --max_trials=2, then re-run again
    as it is."""
    workdir = tmp_path_factory.mktemp("robust")
    args = [*SEARCHED, "--objective=robust", "--tuner=random"]
    calls = []
    measure = tuning.measure

    def interrupted(run, trial_dir, objective, seed=0):
        calls.append(os.path.basename(trial_dir))
        if os.path.basename(trial_dir) == "trial_0":
            raise KeyboardInterrupt  # like Ctrl-C; keras-tuner only catches Exceptions
        return measure(run, trial_dir, objective, seed=seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning, "measure", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _search(manifest, workdir, *args, "--max_trials=1")
    assert calls == ["baseline", "trial_0"]
    assert not (workdir / "trial_0" / "tune_trial.json").exists()
    # keras-tuner's state is there to be reloaded (it writes its own only when a trial ends).
    assert (workdir / "tuner0.json").exists()
    assert json.loads((workdir / "oracle.json").read_text())["ongoing_trials"] == {"tuner0": "0"}
    kept = ["baseline/tune_trial.json", "trial_0/model.keras"]
    before = {path: _mtime(workdir, path) for path in kept}
    summary = _search(manifest, workdir, *args, "--max_trials=2")
    kept += ["trial_0/tune_trial.json", "trial_1/model.keras", "trial_1/tune_trial.json"]
    after = {path: _mtime(workdir, path) for path in kept}
    again = _search(manifest, workdir, *args, "--max_trials=2")
    return workdir, summary, (before, after), again


def test_robust_objective_is_the_robust_validation_uar_of_validation_speakers_only(
        robust_search):
    workdir, summary, _, _ = robust_search
    assert summary["objective"]["kind"] == "robust"
    (fold,) = summary["folds"]
    assert fold["test_speakers"] == ["s01"] and len(fold["val_speakers"]) == 1
    assert "s01" not in fold["val_speakers"]
    assert len(summary["trials"]) == 2
    for t in summary["trials"]:
        assert t["status"] == "COMPLETED"
        assert t["objective"] == t["val_robust_uar"]
        # Measured on the validation speaker's utterances (3 emotions x 3), not the test's.
        assert t["folds"][0]["val_speakers"] == fold["val_speakers"]
        assert t["folds"][0]["n_val"] == 9
        record = json.loads((workdir / f"trial_{t['trial_id']}" / "tune_trial.json").read_text())
        assert record["val_robust_uar"] == t["val_robust_uar"]
        metrics = json.loads((workdir / f"trial_{t['trial_id']}" / "metrics.json").read_text())
        assert t["val_uar"] == metrics["best_val_uar"]
    _check_best_flags(summary, workdir)


def test_interrupted_search_resumes_without_redoing_trials(robust_search):
    workdir, summary, (before, after), again = robust_search
    assert sorted(p.name for p in workdir.glob("trial_*")) == ["trial_0", "trial_1"]
    # The baseline was measured once; trial 0 was trained once (its model is the one from
    # before the interruption) and measured on the re-run, which added trial 1.
    for path, stamp in before.items():
        assert after[path] == stamp, path
    values = [json.dumps(t["hyperparameters"], sort_keys=True) for t in summary["trials"]]
    assert len(set(values)) == 2
    # Re-running a finished search redoes nothing and reports the same.
    for path, stamp in after.items():
        assert _mtime(workdir, path) == stamp, path
    assert [t["trial_id"] for t in again["trials"]] == ["0", "1"]
    assert again["trials"] == summary["trials"] and again["best"] == summary["best"]


def _hparams_runs(tb_dir) -> dict[str, tuple[dict, dict]]:
    """Per TensorBoard run under ``tb_dir``: its hparams and its scalar metrics."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    runs = {}
    for root, _, files in os.walk(tb_dir):
        for name in files:
            hparams, scalars = {}, {}
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for v in event.summary.value:
                    if v.tag == metadata.SESSION_START_INFO_TAG:
                        data = plugin_data_pb2.HParamsPluginData.FromString(
                            v.metadata.plugin_data.content)
                        for key, value in data.session_start_info.hparams.items():
                            hparams[key] = getattr(value, value.WhichOneof("kind"))
                    elif v.tag.startswith("tune/"):
                        scalars[v.tag] = float(tf.make_ndarray(v.tensor))
            runs[os.path.relpath(root, tb_dir)] = (hparams, scalars)
    return runs


def test_every_trial_is_a_run_of_the_hparams_dashboard(robust_search):
    workdir, summary, _, _ = robust_search
    runs = _hparams_runs(workdir / "tb")
    assert set(runs) == {".", "baseline", "trial_0", "trial_1"}
    for t in summary["trials"]:
        hparams, scalars = runs[f"trial_{t['trial_id']}"]
        assert hparams == pytest.approx(t["hyperparameters"])
        assert set(hparams) == {"n_mels", "conv_filters", "dropout", "learning_rate"}
        assert scalars["tune/objective"] == pytest.approx(t["objective"])
        assert scalars["tune/val_robust_uar"] == pytest.approx(t["val_robust_uar"])
        assert scalars["tune/val_uar"] == pytest.approx(t["val_uar"])
    table = tuning.format_summary(summary).split("\n")
    assert table[2].startswith("base ")
    best = summary["best"]["trial_id"]
    assert [row[:2] for row in table[3:]] == [("*" if t["trial_id"] == best else " ")
                                              + t["trial_id"] for t in summary["trials"]]


def test_the_baseline_is_the_base_flags_measured_as_a_trial_is(robust_search):
    workdir, summary, _, _ = robust_search
    baseline = summary["baseline"]
    assert baseline["hyperparameters"] == {"n_mels": 24, "conv_filters": "4,8",
                                           "dropout": 0.3, "learning_rate": 0.001}
    assert baseline["objective"] == baseline["val_robust_uar"]
    metrics = json.loads((workdir / "baseline" / "metrics.json").read_text())
    assert baseline["val_uar"] == metrics["best_val_uar"]
    flags_txt = (workdir / "baseline" / "flags.txt").read_text().split("\n")
    assert "--n_mels=24" in flags_txt and "--conv_filters=4,8" in flags_txt
    hparams, scalars = _hparams_runs(workdir / "tb")["baseline"]
    assert hparams == pytest.approx(baseline["hyperparameters"])
    assert scalars["tune/objective"] == pytest.approx(baseline["objective"])


def test_hyperband_trials_train_for_tuner_epochs_and_mix_weights_the_figures(manifest,
                                                                             tmp_path):
    summary = _search(manifest, tmp_path, *SEARCHED, "--tuner=hyperband", "--epochs=2",
                      "--hyperband_factor=2", "--max_trials=1", "--objective=mix",
                      "--objective_weight=0.25", "--baseline=false")
    assert summary["baseline"] is None and len(summary["trials"]) == 1
    for t in summary["trials"]:
        # Hyperband's first round: one epoch of the base --epochs=2, as the trial's --epochs.
        assert t["hyperparameters"]["epochs"] == 1
        metrics = json.loads((tmp_path / f"trial_{t['trial_id']}" / "metrics.json").read_text())
        assert metrics["epochs_run"] == 1
        assert t["objective"] == pytest.approx(0.75 * t["val_uar"] + 0.25 * t["val_robust_uar"])
    _check_best_flags(summary, tmp_path)
    assert "--epochs=1" in (tmp_path / "best.flags").read_text().split()


def test_clean_objective_is_the_validation_uar(manifest, tmp_path):
    summary = _search(manifest, tmp_path, *SEARCHED, "--objective=clean", "--max_trials=1",
                      "--baseline=false")
    (trial,) = summary["trials"]
    assert trial["objective"] == trial["val_uar"]
    assert "val_robust_uar" in trial  # measured whatever the objective
    _check_best_flags(summary, tmp_path)


@pytest.mark.filterwarnings("ignore:The optimal value found")  # the GP on four points
def test_bayesian_oracle_searches_the_space_with_its_gaussian_process(manifest, tmp_path):
    pytest.importorskip("scipy")
    pytest.importorskip("sklearn")
    search = tune.prepare(_parse(manifest, tmp_path, *SEARCHED, "--tuner=bayesian",
                                 "--bayesian_initial_points=2", "--max_trials=4",
                                 "--space=conv_filters=2,4|4,8"))
    oracle = search.make_oracle()
    assert type(oracle).__name__ == "BayesianOptimizationOracle"
    oracle._set_project_dir(str(tmp_path), "oracle")
    # Scores that grow with the learning rate: the Gaussian process proposes after two
    # random points (string choices, log-scaled floats and all).
    for _ in range(4):
        trial = oracle.create_trial("tuner0")
        values = tuning.trial_values(trial.hyperparameters.values, search.space)
        assert values["n_mels"] in (16, 24, 32) and values["conv_filters"] in ("2,4", "4,8")
        assert 1e-4 <= values["learning_rate"] <= 1e-2 and 0.0 <= values["dropout"] <= 0.5
        oracle.update_trial(trial.trial_id, {"objective": float(np.log10(
            values["learning_rate"]))})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    assert len(oracle.get_best_trials(4)) == 4


@pytest.mark.parametrize("extra, message", [
    (["--objective_attack=nope"], "unknown attack 'nope'"),
    (["--objective_budget=-40"], "is not KIND:VALUE"),
    (["--objective_budget=linf_db:loud"], "'loud' is not a number"),
    (["--objective_budget=snr_db:30"], "fgsm is an L-inf attack"),
    (["--objective_steps=3"], "fgsm takes no steps"),
    (["--objective=mix", "--objective_weight=1.5"], "weight must be in [0, 1]"),
    (["--hparams=n_mels,depth"], "unknown hyperparameters ['depth']"),
    (["--hparams=adv_ratio"], "adv_ratio, which does not apply here"),
    (["--hparams=n_mels,dropout", "--space=lstm_units=8|16"], "lstm_units, which is not searched"),
    (["--space=dropout=0.5:0.1"], "low end must be below its high end"),
    (["--space=n_mels=many"], "--space=n_mels=many"),
    (["--space=dropout"], "is not NAME=SPEC"),
    (["--space=learning_rate=0:0.1"], "log scale"),
    (["--trainer=adversarial", "--hparams=n_mels,adv_budget", "--space=adv_budget=linf:0.5"],
     "adv_budget=linf:0.5 is not a valid ser-train value"),
    (["--val_speakers=0"], "--val_speakers must be >= 1"),
    (["--refit"], "tune without it"),
    (["--tuner=random", "--max_trials=0"], "--max_trials must be >= 1"),
])
def test_bad_settings_are_clear_usage_errors(manifest, tmp_path, extra, message):
    with pytest.raises(app.UsageError) as err:
        tune.prepare(_parse(manifest, tmp_path, *SEARCHED, *extra))
    assert message in str(err.value)


def test_bayesian_without_scipy_names_the_missing_package(manifest, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # what `import scipy` sees when absent
    with pytest.raises(app.UsageError) as err:
        tune.prepare(_parse(manifest, tmp_path, *SEARCHED, "--tuner=bayesian"))
    assert "--tuner=bayesian needs scipy" in str(err.value)
    assert ".[tune]" in str(err.value)


def test_a_workdir_keeps_its_search(manifest, robust_search):
    workdir = robust_search[0]
    with pytest.raises(app.UsageError) as err:
        tune.prepare(_parse(manifest, workdir, *SEARCHED, "--objective=clean"))
    assert "holds another search" in str(err.value) and "objective" in str(err.value)
