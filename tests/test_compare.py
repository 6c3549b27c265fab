"""`make compare`, the fair loss comparison: search spaces, trial folders, tables, resuming a killed study, and the
whole protocol end to end on tiny data."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy import stats

from metricsearch.analysis.files import read_csv
from metricsearch.pipelines.compare import (
    SPACE_DIR,
    CompareError,
    FoldRun,
    Interval,
    LossSummary,
    available_losses,
    best_trial,
    budget_trials,
    format_compare_markdown,
    format_params,
    load_protocol,
    load_search_space,
    occupied_trials,
    params_key,
    parse_search_space,
    reclaim_dead_trials,
    run_overrides,
    sample_params,
    trial_rows,
    worker_id,
)
from tests.helpers import REPO_ROOT, TINY, compose_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_every_search_space_parses_and_samples_inside_its_ranges():
    losses = available_losses()
    assert {"contrastive", "triplet", "multi_similarity", "ntxent", "proxy_anchor", "normalized_softmax"} <= set(losses)
    for loss in losses:
        space = load_search_space(loss)
        assert space.loss == loss
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
        for _ in range(20):
            trial = study.ask()
            params = sample_params(trial, space)
            assert list(params) == [p.name for p in space.params]
            for p in space.params:
                assert p.low <= params[p.name] <= p.high, (loss, p.name, params[p.name])
            study.tell(trial, 0.0)


def test_the_yaml_ranges_become_optuna_distributions():
    space = load_search_space("multi_similarity")
    by_name = {p.name: p for p in space.params}
    assert (by_name["loss.alpha"].low, by_name["loss.alpha"].high, by_name["loss.alpha"].log) == (0.01, 100.0, True)
    assert (by_name["loss.base"].low, by_name["loss.base"].high, by_name["loss.base"].log) == (0.0, 1.0, False)
    # A fixed trial gets back exactly the values it was given.
    fixed = {"loss.alpha": 2.0, "loss.beta": 40.0, "loss.base": 0.5, "miner.epsilon": 0.1}
    assert sample_params(optuna.trial.FixedTrial(fixed), space) == fixed
    # The contrastive miner's margins follow the loss's.
    assert "miner.neg_margin=${loss.neg_margin}" in load_search_space("contrastive").overrides


def test_choices_integers_and_bad_ranges():
    space = parse_search_space(
        "x",
        {
            "params": {
                "miner.type_of_triplets": {"choices": ["semihard", "hard"]},
                "k": {"type": "int", "low": 1, "high": 3},
            }
        },
    )
    assert sample_params(optuna.trial.FixedTrial({"miner.type_of_triplets": "hard", "k": 2}), space) == {
        "miner.type_of_triplets": "hard",
        "k": 2,
    }
    with pytest.raises(CompareError, match="low must be below high"):
        parse_search_space("x", {"params": {"loss.margin": {"low": 1.0, "high": 0.5}}})
    with pytest.raises(CompareError, match="above 0 with log"):
        parse_search_space("x", {"params": {"loss.margin": {"low": 0.0, "high": 1.0, "log": True}}})
    with pytest.raises(CompareError, match="searches no parameters"):
        parse_search_space("x", {"params": {}})
    with pytest.raises(CompareError, match="losses with one: .*triplet"):
        load_search_space("no_such_loss")


def test_the_protocol_file_and_command_line_values():
    protocol = load_protocol(trials=3, seeds=(0, 1))
    assert protocol.trials == 3 and protocol.seeds == (0, 1)
    assert protocol.monitor == "val/map@r" and protocol.folds >= 2
    assert all((SPACE_DIR / f"{loss}.yaml").is_file() for loss in protocol.losses)
    assert "experiment=mlrc_base" in protocol.dataset_overrides["cub"]
    with pytest.raises(CompareError, match="at least 2 class-disjoint folds"):
        load_protocol(folds=1)


def test_a_trial_killed_before_recording_its_key_still_names_its_folder():
    distributions = {"loss.margin": optuna.distributions.UniformDistribution(0.0, 1.0)}
    killed = optuna.trial.create_trial(
        params={"loss.margin": 0.25}, distributions=distributions, state=optuna.trial.TrialState.FAIL
    )
    (row,) = trial_rows("synthetic", "triplet", [killed], budget=2, folds=2)
    assert row["key"] == params_key({"loss.margin": 0.25})
    assert row["folder"] == str(Path("synthetic") / "triplet" / "search" / row["key"])


def test_trial_folders_are_named_by_the_parameters():
    assert params_key({"loss.margin": 0.1, "miner.epsilon": 0.2}) == params_key(
        {"miner.epsilon": 0.2, "loss.margin": 0.1}
    )
    assert params_key({"loss.margin": 0.1}) != params_key({"loss.margin": 0.1000001})
    assert len(params_key({"loss.margin": 0.1})) == 12
    root = Path("/r")
    assert FoldRun("synthetic", "triplet", "search", 1, 0, "abc").folder(root) == Path(
        "/r/synthetic/triplet/search/abc/fold1"
    )
    assert FoldRun("synthetic", "triplet", "tuned", 0, 2, "abc").folder(root) == Path(
        "/r/synthetic/triplet/final/tuned-abc/seed2/fold0"
    )
    assert FoldRun("synthetic", "triplet", "default", 3, 0).folder(root) == Path(
        "/r/synthetic/triplet/final/default/seed0/fold3"
    )


def test_search_runs_never_test_and_final_runs_keep_their_embeddings(tmp_path):
    protocol = load_protocol(folds=3, epochs=2)
    space = load_search_space("contrastive")
    params = {"loss.pos_margin": 0.25, "loss.neg_margin": 0.75}
    search = run_overrides(
        FoldRun("synthetic", "contrastive", "search", 2, 0, "k"),
        protocol,
        space.overrides,
        params,
        tmp_path,
        ["trainer.max_epochs=1"],
    )
    assert {"test=false", "test_untrained=false", "data.num_folds=3", "data.fold=2", "monitor=val/map@r"} <= set(search)
    assert "loss.pos_margin=0.25" in search and not any("save_test_embeddings" in o for o in search)
    assert search[-1] == "trainer.max_epochs=1" and search.index("trainer.max_epochs=2") < len(search) - 1
    final = run_overrides(
        FoldRun("synthetic", "contrastive", "default", 0, 1), protocol, space.overrides, {}, tmp_path, ["logger=wandb"]
    )
    assert {"test=true", "save_test_embeddings=true", "seed=1", "logger.wandb.job_type=final"} <= set(final)
    assert "logger.wandb.group=synthetic/contrastive" in final
    assert "logger.wandb.job_type=search" in run_overrides(
        FoldRun("synthetic", "contrastive", "search", 0, 0, "k"), protocol, (), {}, tmp_path, ["logger=wandb"]
    )
    # The overrides compose into the config train.py runs: the miner's margins follow the searched ones.
    cfg = compose_config([o for o in search if not o.startswith("hydra.")], tmp_path / "run", tmp_path / "data")
    assert cfg.test is False and cfg.data.num_folds == 3 and cfg.data.fold == 2
    assert (cfg.loss.pos_margin, cfg.miner.pos_margin, cfg.miner.neg_margin) == (0.25, 0.25, 0.75)
    cfg = compose_config([o for o in final if not o.startswith("hydra.")], tmp_path / "run", tmp_path / "data")
    assert cfg.save_test_embeddings is True and cfg.test is True
    assert (cfg.logger.wandb.group, cfg.logger.wandb.job_type) == ("synthetic/contrastive", "final")


def _trial(number: int, state: str, value: float | None = None) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(
        state=getattr(optuna.trial.TrialState, state),
        value=value,
        params={"loss.margin": 0.1 * number},
        distributions={"loss.margin": optuna.distributions.UniformDistribution(0.0, 1.0)},
        user_attrs={"key": f"k{number}"},
    )
    trial.number = number
    return trial


def test_every_loss_gets_the_same_budget_of_finished_trials():
    trials = [
        _trial(0, "COMPLETE", 0.2),
        _trial(1, "FAIL"),
        _trial(2, "PRUNED"),
        _trial(3, "COMPLETE", 0.5),
        _trial(4, "COMPLETE", 0.9),
    ]
    # Failed trials do not count; a worker's extra trial (number 4) beyond the budget of 3 is not used.
    assert [t.number for t in budget_trials(trials, 3)] == [0, 2, 3]
    assert best_trial(trials, 3).number == 3
    assert best_trial(trials, 5).number == 4
    assert best_trial([_trial(0, "FAIL")], 3) is None


def test_a_trial_of_a_dead_process_is_failed_and_retried_with_its_parameters(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(storage=storage, study_name="synthetic/triplet", direction="maximize")
    alive = study.ask()
    alive.suggest_float("loss.margin", 0.0, 1.0)
    alive.set_user_attr("worker", worker_id())
    dead = study.ask()
    margin = dead.suggest_float("loss.margin", 0.0, 1.0)
    dead.set_user_attr("worker", f"{os.uname().nodename}:{2**22 + 7}:0.00")  # no such process
    assert reclaim_dead_trials(study) == [dead.number]
    states = {t.number: t.state.name for t in study.trials}
    assert states[alive.number] == "RUNNING" and states[dead.number] == "FAIL"
    retry = next(t for t in study.trials if t.state.name == "WAITING")
    assert retry.params == {"loss.margin": margin} and retry.system_attrs["failed_trial"] == dead.number
    assert reclaim_dead_trials(study) == []
    assert retry.user_attrs["worker"] == ""  # not the dead process's
    assert occupied_trials(study.trials) == 2  # the live running trial and the waiting retry
    # A trial started (here: the retry) but stopped before its objective recorded a worker holds no place in the
    # budget; it is failed once older than the grace period (not yet).
    assert study.ask().number == retry.number
    assert occupied_trials(study.trials) == 1
    assert reclaim_dead_trials(study, grace_period=3600) == []


def test_the_table_shows_intervals_marks_and_the_search():
    def summary(loss, tuned, default, values, best=0.4):
        s = LossSummary("synthetic", loss, 8, {"COMPLETE": 7, "PRUNED": 1}, best, {"loss.margin": 0.123456}, "abc")
        s.tuned = {"map@r": tuned}
        s.default = {"map@r": default}
        s.concatenated = {"map@r": Interval(0.5, 0.45, 0.55, 3)}
        s.tuned_values = {"map@r": values}
        s.folders = {"tuned": f"synthetic/{loss}/final/tuned-abc"}
        return s

    rows = [
        summary("triplet", Interval(0.30, 0.28, 0.32, 6), Interval(0.25, math_nan, math_nan, 1), [0.29, 0.3, 0.31] * 2),
        summary("ntxent", Interval(0.40, 0.37, 0.43, 6), Interval(0.35, 0.3, 0.4, 6), [0.38, 0.4, 0.42] * 2),
    ]
    table = format_compare_markdown(rows)
    assert "| ntxent | 8 (7 complete, 1 pruned) | 40.0 | margin 0.123 | synthetic/ntxent/final/tuned-abc |" in table
    assert "#### MAP@R (test, %)" in table and "#### R@1" not in table
    lines = table.splitlines()
    header = lines.index("| loss | tuned, separate | tuned, concatenated | default params, separate | vs best |")
    assert lines[header + 2] == "| ntxent | 40.0 ± 3.0 | 50.0 ± 5.0 | 35.0 ± 5.0 | best |"
    assert lines[header + 3] == "| triplet | 30.0 ± 2.0 | 50.0 ± 5.0 | 25.0 |  |"  # Welch: clearly worse
    assert format_params({"loss.alpha": 2.0, "miner.epsilon": 0.1}) == "alpha 2, miner.epsilon 0.1"


math_nan = float("nan")


# ----------------------------------------------------------------------------------------------------------------
# End to end


def _compare(args: list[str], timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "scripts/compare.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _trial_states(db: Path, study: str) -> list[str]:
    if not db.is_file():
        return []
    with sqlite3.connect(db, timeout=30) as connection:
        try:
            rows = connection.execute(
                "SELECT t.state FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ?",
                (study,),
            ).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
    return [row[0] for row in rows]


def _fold_classes(run_dir: Path) -> tuple[set[int], set[int], set[int]]:
    """The train, validation and test classes of a run, from the data settings its config.yaml records."""
    cfg = OmegaConf.create(yaml.safe_load((run_dir / "config.yaml").read_text()))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    return (
        set(datamodule.train_records.classes.tolist()),
        set(datamodule.val_records.classes.tolist()),
        set(datamodule.split.test.classes.tolist()),
    )


# In the default suite: about 3-5 minutes on two cores.
def test_the_protocol_end_to_end_killed_and_resumed(tmp_path, data_dir):
    results = tmp_path / "compare"
    extra = shlex.join([*TINY, "data.source.num_classes=20", f"paths.data_dir={data_dir}"])
    args = [f"results_dir={results}", f"extra={extra}", "trials=2", "folds=2", "seeds=0"]
    db = results / "optuna.db"

    # 1. Killed (the whole process group, as Ctrl-C would) once the first trial of the first loss is complete.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "scripts/compare.py", *args, "losses=triplet,ntxent"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while process.poll() is None and "COMPLETE" not in _trial_states(db, "synthetic/triplet"):
                time.sleep(0.2)
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            process.wait()
    finished_before = {
        path.parent: path.stat().st_mtime_ns for path in results.glob("synthetic/triplet/search/*/fold*/metrics.json")
    }
    assert len(finished_before) >= 2  # the first trial's two folds

    # 2. The same command again: the finished trial and its folds are kept, the interrupted trial is retried.
    second = _compare([*args, "losses=triplet,ntxent"])
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    for folder, mtime in finished_before.items():
        assert (folder / "metrics.json").stat().st_mtime_ns == mtime
        assert (folder / "reproduce.log").read_text().count("train.py") == 1, folder
    trials = {row["trial"]: row for row in read_csv(results / "trials.csv") if row["loss"] == "triplet"}
    complete = [row for row in trials.values() if row["state"] == "COMPLETE"]
    assert len(complete) == 2 and len({row["key"] for row in complete}) == 2
    # A trial killed before it drew its parameters stays RUNNING (without parameters, it holds no budget).
    assert all(row["state"] in ("COMPLETE", "FAIL") or row["params"] == "{}" for row in trials.values())
    for row in trials.values():
        if row["state"] == "FAIL" and row["params"] != "{}":  # killed mid-trial: retried with its parameters
            retry = next(r for r in complete if r["retry_of"] == row["trial"])
            assert retry["key"] == row["key"]
    for loss in ("triplet", "ntxent"):
        assert _trial_states(db, f"synthetic/{loss}").count("COMPLETE") == 2
        keys = {
            row["key"] for row in read_csv(results / "trials.csv") if row["loss"] == loss and row["state"] == "COMPLETE"
        }
        assert {p.name for p in (results / "synthetic" / loss / "search").iterdir()} == keys

    # 3. The test classes were never evaluated during the search; only the final runs were tested.
    search_runs = sorted(results.glob("synthetic/*/search/*/fold*"))
    assert len(search_runs) == 8
    for run in search_runs:
        metrics = json.loads((run / "metrics.json").read_text())["metrics"]
        assert set(metrics) == {"val_best"}, run
        assert not (run / "test_embeddings.npz").exists() and not list(run.rglob("*test*"))
    final_runs = sorted(results.glob("synthetic/*/final/*/seed0/fold*"))
    assert len(final_runs) == 8  # 2 losses x (tuned, default) x 2 folds x 1 seed
    for run in final_runs:
        result = json.loads((run / "metrics.json").read_text())
        assert "test" in result["metrics"]
        assert (run / "test_embeddings.npz").is_file()
        # A finished final run keeps its selected checkpoint only; a search run keeps none.
        kept = [p.name for p in (run / "checkpoints").iterdir()]
        assert kept == [Path(result["best_checkpoint"]).name] and kept != ["last.ckpt"], run
    assert not [p for p in search_runs if (p / "checkpoints").exists()]

    # 4. The folds are class-disjoint, cover the training classes, and never include a test class.
    for group in [*results.glob("synthetic/*/search/*"), *results.glob("synthetic/*/final/*/seed0")]:
        (train0, val0, test0), (train1, val1, test1) = (_fold_classes(group / f"fold{k}") for k in (0, 1))
        assert val0 and val1 and not val0 & val1
        assert train0 == val1 and train1 == val0  # two folds: each trains on the other
        assert test0 == test1 and not (val0 | val1) & test0

    # 5. The intervals come from the runs' own numbers: a plain t-interval over the final runs' metrics.json.
    summary = read_csv(results / "summary.csv")
    markdown = (results / "compare.md").read_text()
    checked = 0
    for row in summary:
        if row["kind"] not in ("tuned", "default") or row["metric"] not in ("recall@1", "map@r", "r_precision"):
            continue
        folder = results / row["folder"]
        values = [
            json.loads(path.read_text())["metrics"]["test"][row["metric"]]
            for path in sorted(folder.glob("seed*/fold*/metrics.json"))
        ]
        assert len(values) == int(row["n"]) == 2
        mean = float(np.mean(values))
        low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-6)
        if np.std(values) > 0:
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), abs=1e-6)
        assert f"{100 * mean:.1f} ± {100 * (high - low) / 2:.1f}" in markdown or np.std(values) == 0
        checked += 1
    assert checked == 2 * 2 * 3
    assert (results / "synthetic" / "intervals.png").stat().st_size > 1000
    assert (results / "synthetic" / "triplet" / "search_history.png").stat().st_size > 1000
    runs = read_csv(results / "runs.csv")
    assert len(runs) == 8 and all((results / r["config"]).is_file() for r in runs)


def test_a_study_continues_only_under_its_own_settings(tmp_path):
    from metricsearch.pipelines.compare import open_storage, open_study

    protocol = load_protocol(folds=2, epochs=1)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", protocol)
    space = load_search_space("triplet")
    study = open_study(storage, "synthetic", space, protocol, ["logger=csv"])
    # The same settings (from a fresh storage object, as a rerun opens it) and other loggers continue the study.
    again = open_study(
        open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", protocol), "synthetic", space, protocol, ["logger=wandb"]
    )
    assert again._study_id == study._study_id
    with pytest.raises(CompareError, match="run with other settings.*trainer.max_epochs=1.*trainer.max_epochs=3"):
        open_study(storage, "synthetic", space, load_protocol(folds=2, epochs=3), [])


def test_the_default_setting_is_read_from_the_loss_config_and_must_lie_in_the_space():
    from metricsearch.pipelines.compare import default_params

    protocol = load_protocol(folds=2)
    defaults = yaml.safe_load((REPO_ROOT / "conf" / "loss" / "multi_similarity.yaml").read_text())["loss"]
    miner = yaml.safe_load((REPO_ROOT / "conf" / "miner" / "multi_similarity.yaml").read_text())
    found = default_params("synthetic", load_search_space("multi_similarity"), protocol)
    assert found == {
        "loss.alpha": defaults["alpha"],
        "loss.beta": defaults["beta"],
        "loss.base": defaults["base"],
        "miner.epsilon": miner["epsilon"],
    }
    narrow = parse_search_space("triplet", {"params": {"loss.margin": {"low": 0.5, "high": 1.0}}})
    margin = yaml.safe_load((REPO_ROOT / "conf" / "loss" / "triplet.yaml").read_text())["loss"]["margin"]
    with pytest.raises(CompareError, match=rf"default loss.margin={margin} is outside its search space \[0.5, 1.0\]"):
        default_params("synthetic", narrow, protocol)


def test_include_default_queues_the_default_setting_as_a_new_studys_first_trial(tmp_path):
    from metricsearch.pipelines.compare import default_params, open_storage, open_study, queue_default_trial

    protocol = load_protocol(folds=2, include_default=True)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", protocol)
    space = load_search_space("ntxent")
    study = open_study(storage, "synthetic", space, protocol, [])
    queued = queue_default_trial(study, "synthetic", space, protocol)
    assert queued == default_params("synthetic", space, protocol)
    # The first trial the search asks for runs the default setting; a rerun queues nothing more.
    trial = study.ask()
    assert sample_params(trial, space) == queued
    study.tell(trial, 0.1)
    assert queue_default_trial(study, "synthetic", space, protocol) is None
    follow = study.ask()
    assert sample_params(follow, space) != queued  # the search proper
    # Off (the default), nothing is queued; and the setting is part of what a study must continue under.
    plain = load_protocol(folds=2)
    other = open_study(storage, "synthetic", load_search_space("triplet"), plain, [])
    assert queue_default_trial(other, "synthetic", load_search_space("triplet"), plain) is None
    assert other.get_trials() == []
    with pytest.raises(CompareError, match="run with other settings.*include_default"):
        open_study(storage, "synthetic", space, plain, [])
