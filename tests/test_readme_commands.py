"""Every command README.md and the documentation pages show works as shown: the commands are read from the pages,
so a change there is tested.

Commands are the ``python train.py ...``, ``python scripts/*.py ...`` and ``make ...`` lines of the code blocks and
inline code spans of README.md and of every page under docs/ (the documentation site). Each ``train.py`` command is
composed into the config it runs:

- one that needs data or pretrained weights this machine lacks (CUB, Cars196, SOP, hub weights) must fail with one
  line that names what is missing and how to supply it, without a traceback;
- the distinct runnable ones (the default run, the real digits) run for real in the fast suite, shrunk by epoch,
  batch and data-size limits only; every other one composes and builds (model, data, loss, miner) there, and runs
  for real in the slow set.

Scripts must exist and answer ``--help`` with every option the README gives them; make targets must be listed by
``make help`` and dry-run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from metricsearch.utils.config import CONFIG_DIR, instantiate_partial_with, normalize_overrides
from tests.helpers import REPO_ROOT, TINY

README = REPO_ROOT / "README.md"
# README.md and every page of the documentation site: a command a user can copy from any of them is checked.
PAGES = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]

# Runnable train.py commands that differ in what they exercise, run for real in the fast suite; every other runnable
# command composes and builds there and runs for real under the slow marker.
# (`python train.py` itself, shrunk the same way, runs in tests/test_train.py::test_train_end_to_end_then_resume.)
FAST_RUNS = {"python train.py data=digits"}
# Not README commands any more, but recipes a README once showed: they must keep working.
EXTRA_TRAIN_COMMANDS = ["python train.py experiment=digits_triplet"]
# Commands with placeholders that cannot be run as written, and the test that runs what they describe.
COVERED_ELSEWHERE = {
    "python train.py ... ckpt_path=outputs/train/<run>/checkpoints/last.ckpt": (
        "tests/test_train.py::test_train_end_to_end_then_resume"
    ),
    # The pairs file is the user's; the test draws one with scripts/make_tuples.py and trains on it.
    "python train.py supervision=pairs data.pairs_file=pairs.csv": (
        "tests/test_supervision.py::test_train_py_supervision_pairs_trains_on_the_file_and_searches"
    ),
    "python train.py supervision=pairs data.pairs_file=data/pairs.csv": (
        "tests/test_supervision.py::test_train_py_supervision_pairs_trains_on_the_file_and_searches"
    ),
    "python train.py supervision=pairs data.pairs_file=pairs.csv data=folder data.root=~/photos": (
        "tests/test_supervision.py::test_train_py_supervision_pairs_trains_on_the_file_and_searches"
    ),
    # A triplets file drawn by scripts/make_tuples.py, trained on through the datamodule and the module.
    "python train.py supervision=triplets data.triplets_file=data/triplets.csv": (
        "tests/test_supervision.py::test_training_batches_carry_no_class_label"
    ),
}
# The shrinking overrides: fewer epochs and batches, no data-loader processes, the fast embedding map.
SHRINK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "callbacks.visualization.method=pca",
]
# A small copy of the built-in synthetic data (only where the data config generates it).
SYNTHETIC_KEYS = ("data.source.", "data.image_size", "data.resize_size", "data.batch_size=", "data.val_fraction")
SYNTHETIC_SHRINK = [override for override in TINY if override.startswith(SYNTHETIC_KEYS)]
BUILT_IN_SOURCES = ("metricsearch.data.synthetic.SyntheticSource", "metricsearch.data.digits.DigitsSource")
HUB_BACKBONE = "metricsearch.models.backbone.TimmBackbone"
# What the one-line messages must say: the hub weights need the internet (or a file); the data folder is named.
WEIGHTS_MESSAGE = "needs its ImageNet weights from the internet"
EMPTY = "not_downloaded"


def readme_commands(text: str) -> list[str]:
    """The ``python ...`` and ``make ...`` commands of ``text``'s code blocks and inline code spans, in order.

    A ``$ `` prompt and a trailing ``# comment`` are dropped; an inline span wrapped after a comma (a list of
    values) is joined without a space.
    """
    commands, prose, in_block = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            prose.append(line)
            continue
        command = re.split(r"\s+#", re.sub(r"^\$\s+", "", line.strip()), maxsplit=1)[0].strip()
        if command.startswith(("python ", "make ")):
            commands.append(command)
    for span in re.findall(r"`([^`]+)`", "\n".join(prose)):
        command = " ".join(re.sub(r",\s*\n\s*", ",", span).split())
        if command.startswith(("python ", "make ")):
            commands.append(command)
    return list(dict.fromkeys(commands))


COMMANDS = list(dict.fromkeys(c for page in PAGES for c in readme_commands(page.read_text(encoding="utf-8"))))
MAKE_COMMANDS = [c for c in COMMANDS if c.startswith("make ")]
SCRIPT_COMMANDS = [c for c in COMMANDS if c.startswith("python scripts/")]


def _train_commands() -> list[str]:
    """train.py commands as shown, plus what ``make train [ARGS=...]`` runs."""
    commands = [c for c in COMMANDS if c.startswith("python train.py")]
    for command in MAKE_COMMANDS:
        words = shlex.split(command)
        if words[1] == "train":
            args = next((w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")), "")
            commands.append(" ".join(["python train.py", *shlex.split(args)]))
    return [c for c in dict.fromkeys(commands + EXTRA_TRAIN_COMMANDS) if c not in COVERED_ELSEWHERE]


TRAIN_COMMANDS = _train_commands()


def test_commands_are_read_from_code_blocks_and_inline_spans():
    text = """Intro `make help` lists targets; `pip install x` is not ours.

```bash
$ make train        # a comment
python train.py data=digits                 # real digits
wandb sweep sweeps/loss.yaml
```

Every loss: `python train.py -m loss=triplet,contrastive,
multi_similarity trainer.max_epochs=1` ran; `python scripts/search.py index=DIR`.
"""
    assert readme_commands(text) == [
        "make train",
        "python train.py data=digits",
        "make help",
        "python train.py -m loss=triplet,contrastive,multi_similarity trainer.max_epochs=1",
        "python scripts/search.py index=DIR",
    ]
    assert TRAIN_COMMANDS and SCRIPT_COMMANDS and MAKE_COMMANDS


def test_the_documentation_pages_commands_are_read_too():
    pages = {page.relative_to(REPO_ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/training.md", "docs/search.md", "docs/comparison.md"} <= pages
    # A command only the pages show (not the README) is among those checked.
    for page in ("docs/search.md", "docs/training.md"):
        shown = readme_commands((REPO_ROOT / page).read_text(encoding="utf-8"))
        assert shown and set(shown) <= set(COMMANDS), page


def test_every_readme_command_has_a_check():
    unknown = [
        c
        for c in COMMANDS
        if c not in COVERED_ELSEWHERE
        and c not in TRAIN_COMMANDS
        and c not in SCRIPT_COMMANDS
        and c not in MAKE_COMMANDS
    ]
    assert not unknown, f"documented commands no test knows how to check: {unknown}"
    for command in TRAIN_COMMANDS:
        assert "..." not in command and "<" not in command, f"{command!r}: add it to COVERED_ELSEWHERE"
    for test in COVERED_ELSEWHERE.values():
        path, name = test.split("::")
        assert f"def {name}(" in (REPO_ROOT / path).read_text(), test


# --- train.py ---


def _split_command(command: str) -> tuple[bool, list[str]]:
    """(multirun?, overrides) of a ``python train.py`` command."""
    args = shlex.split(command)[2:]
    multirun = any(a in ("-m", "--multirun") for a in args)
    return multirun, [a for a in args if a not in ("-m", "--multirun")]


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a Hydra multirun: one per combination of the comma-separated values."""
    choices = []
    for override in overrides:
        key, sep, value = override.partition("=")
        values = value.split(",") if sep and "," in value and not value.startswith(("[", "{")) else [value]
        choices.append([f"{key}{sep}{v}" for v in values] if sep else [override])
    return [list(job) for job in itertools.product(*choices)]


def _compose(overrides: list[str], tmp_path: Path, data_dir: Path, hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=normalize_overrides(overrides), return_hydra_config=hydra_config)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.data_dir = str(data_dir)
    return cfg


def _needs_data(cfg: DictConfig) -> bool:
    return cfg.data.source._target_ not in BUILT_IN_SOURCES


def _needs_hub_weights(cfg: DictConfig) -> bool:
    return cfg.backbone._target_ == HUB_BACKBONE and cfg.backbone.pretrained and not cfg.backbone.weights_file


def _shrink(overrides: list[str], cfg: DictConfig) -> list[str]:
    """``overrides`` with the shrinking settings (which replace the command's own values of the same keys)."""
    synthetic = cfg.data.source._target_.endswith("SyntheticSource")
    shrink = SHRINK + (SYNTHETIC_SHRINK if synthetic else [])
    if synthetic and cfg.data.source.get("protocol") == "closed_set":
        # The closed-set stand-in tests on the last sixth of each class: at least 12 images per class for two.
        shrink = [s for s in shrink if not s.startswith("data.source.images_per_class=")]
        shrink.append("data.source.images_per_class=12")
    keys = {s.split("=", 1)[0] for s in shrink}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + shrink


def _with_placeholders(overrides: list[str], tmp_path: Path) -> list[str]:
    """The README's ``PATH`` placeholder becomes an empty folder: data that is not on this machine."""
    empty = tmp_path / EMPTY
    empty.mkdir(exist_ok=True)
    return [re.sub(r"=PATH$", f"={empty}", o) for o in overrides]


def _run_train(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # Offline, with an empty hub cache: pretrained weights are as unavailable as on a machine without internet.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_args(multirun: bool, overrides: list[str], tmp_path: Path, sweep: bool = False) -> list[str]:
    """The command's arguments again (``-m`` first), with the run (or sweep) folder inside the test's folder."""
    if multirun or sweep:
        return [*(["-m"] if multirun else []), *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return [*overrides, f"hydra.run.dir={tmp_path / 'run'}"]


def _assert_one_line_failure(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed without a traceback; returns the line of stderr that holds one of ``fragments``."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Hydra's "Error executing job with overrides: [...]" echoes the command, not a message.
    lines = [
        line
        for line in result.stderr.splitlines()
        if any(f and f in line for f in fragments) and not line.startswith("Error executing job")
    ]
    assert lines, f"no line with any of {fragments} in:\n{result.stderr[-3000:]}"
    return lines[0]


def _check_trained(tmp_path: Path, multirun: bool, jobs: int) -> None:
    folders = [tmp_path / "sweep" / str(i) for i in range(jobs)] if multirun else [tmp_path / "run"]
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert 0.0 <= metrics["test"]["recall@1"] <= 1.0, folder
        assert "recall@1" in metrics["val_best"], folder


def _build_all(configs: list[DictConfig]) -> None:
    """What each run would assemble before training: model, data and its batches, loss, miner, optimizer.

    Jobs of a multirun that differ only in loss and miner build those alone.
    """
    from metricsearch.pipelines.train import build_run

    built = set()
    for cfg in configs:
        rest = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k not in ("loss", "miner", "hydra")})
        if rest not in built:
            built.add(rest)
            module, datamodule = build_run(cfg)
            assert module.model.embedding_dim == cfg.head.embedding_dim
            assert datamodule.num_train_classes >= 2
            continue
        loss_cfg = OmegaConf.to_container(cfg.loss, resolve=True)
        loss_cfg.pop("lr_multiplier", None)
        assert instantiate_partial_with(loss_cfg, num_classes=8, embedding_size=cfg.head.embedding_dim) is not None
        if cfg.get("miner"):
            instantiate(cfg.miner)


@pytest.mark.parametrize("command", TRAIN_COMMANDS, ids=str)
def test_train_command(command: str, tmp_path: Path, data_dir: Path) -> None:
    """Runs (or composes and builds) the command, or checks its one-line message about what this machine lacks."""
    multirun, overrides = _split_command(command)
    overrides = _with_placeholders(overrides, tmp_path)
    jobs = _jobs(overrides) if multirun else [overrides]
    configs = [_compose(job, tmp_path, data_dir, hydra_config=True) for job in jobs]
    for cfg in configs:
        if cfg.hydra.sweeper.get("params"):
            # A sweeper may only search settings the run has, and must optimize what selects the checkpoint.
            for key in cfg.hydra.sweeper.params:
                assert OmegaConf.select(cfg, key) is not None, f"{command}: hydra.sweeper.params.{key}"
            assert cfg.optimized_metric == cfg.monitor
    needs_data = any(_needs_data(cfg) for cfg in configs)
    needs_weights = [cfg.backbone.model_name for cfg in configs if _needs_hub_weights(cfg)]
    if needs_data or needs_weights:
        # As shown, on a machine without the dataset or the hub weights.
        result = _run_train(_train_args(multirun, overrides, tmp_path), tmp_path)
        data_dir_named = str(tmp_path / EMPTY) if needs_data else ""
        line = _assert_one_line_failure(result, WEIGHTS_MESSAGE if needs_weights else "", data_dir_named)
        if WEIGHTS_MESSAGE in line:
            assert "backbone.weights_file=PATH" in line and needs_weights[0] in line, line
            if not multirun:  # a single run reports it as train.py's one error line, exit status 2
                assert line.startswith("error: ") and result.returncode == 2, result.stderr[-3000:]
                assert "Error in call to target" not in result.stderr, result.stderr[-3000:]
        else:
            assert needs_data and str(tmp_path / EMPTY) in line and re.search("missing|does not exist", line), line
        # Without the weights, everything else the command asks for must build; without the data, say so.
        jobs = [[*job, "backbone.pretrained=false"] if needs_weights else job for job in jobs]
    if command in FAST_RUNS:
        result = _run_train(_train_args(multirun, _shrink(overrides, configs[0]), tmp_path), tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        _check_trained(tmp_path, multirun, len(jobs))
        return
    shrunk = [_compose(_shrink(job, cfg), tmp_path, data_dir) for job, cfg in zip(jobs, configs, strict=True)]
    if needs_data:
        from metricsearch.data.records import DatasetError
        from metricsearch.pipelines.train import build_run

        with pytest.raises(DatasetError) as missing:
            build_run(shrunk[0])
        assert "\n" not in str(missing.value) and str(tmp_path / EMPTY) in str(missing.value)
        return
    _build_all(shrunk)


SLOW_RUNS = [c for c in TRAIN_COMMANDS if c not in FAST_RUNS]


@pytest.mark.slow
@pytest.mark.parametrize("command", SLOW_RUNS, ids=str)
def test_train_command_runs(command: str, tmp_path: Path, data_dir: Path) -> None:
    """The commands the fast suite only builds, run for real (shrunk); pretrained weights replaced by none."""
    multirun, overrides = _split_command(command)
    cfg = _compose(_jobs(overrides)[0], tmp_path, data_dir)
    if _needs_data(cfg):
        pytest.skip(f"{cfg.data.source._target_} needs a dataset on disk")
    if _needs_hub_weights(cfg):
        overrides = [*overrides, "backbone.pretrained=false"]
    optuna = "hparams_search=optuna" in overrides
    if optuna:
        overrides = [*overrides, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1"]
    result = _run_train(_train_args(multirun, _shrink(overrides, cfg), tmp_path, sweep=optuna), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_trained(tmp_path, multirun or optuna, 2 if optuna else len(_jobs(overrides)))


# --- scripts ---


def _script_help(script: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """``python SCRIPT --help``, run in this process (the scripts' imports are shared with the other tests)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert exited.value.code in (0, None) and "usage" in output.lower(), output[-3000:]
    return output


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=str)
def test_script_command_exists_and_answers_help(
    command: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script exists, ``--help`` answers, and every option the README gives it is one the script lists."""
    words = [w.strip("[]") for w in shlex.split(command)[1:]]
    script = words[0]
    assert (REPO_ROOT / script).is_file(), script
    output = _script_help(script, capsys, monkeypatch)
    key_value_style = "key=value" in output
    for word in words[1:]:
        if word.startswith("--"):
            assert word in output, f"{command}: {word} is not in {script} --help"
        elif "=" in word and key_value_style:
            key = word.split("=", 1)[0]
            group = key.split(".", 1)[0]
            assert f"{key}=" in output or f"{group}.KEY=" in output, f"{command}: {key}= is not in {script} --help"


def test_dataset_scripts_say_where_the_data_is_missing(tmp_path: Path) -> None:
    """The README's data commands without the data: where to get it, and one line naming what is missing."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    info = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "data=cub", "--info"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0 and "CUB_200_2011" in info.stdout, info.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "scripts/check_data.py", "data=cub", f"data.root={tmp_path}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode != 0 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert check.stderr.strip().count("\n") == 0 and "is missing" in check.stderr and str(tmp_path) in check.stderr


# --- make ---


@pytest.fixture(scope="module")
def make_targets() -> set[str]:
    """The targets ``make help`` lists."""
    result = subprocess.run(["make", "help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    return set(re.findall(r"^\s+([\w-]+)\s", plain, re.MULTILINE))


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=str)
def test_make_command_is_a_target_that_dry_runs(command: str, make_targets: set[str]) -> None:
    """The target is listed by ``make help``, dry-runs, and the programs it runs exist."""
    words = shlex.split(command)
    assert words[1] in make_targets, f"{command}: {words[1]} is not among the targets of make help: {make_targets}"
    result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for program in re.findall(r"\b(train\.py|scripts/[\w.]+\.(?:py|sh))\b", result.stdout):
        assert (REPO_ROOT / program).is_file(), f"{command} runs {program}, which does not exist"
    args = next((w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")), "")
    if args:
        assert args in result.stdout, f"{command}: ARGS are not passed on:\n{result.stdout}"
