"""The one command-line convention of ``scripts/*.py`` (metricsearch.cli.args): ``key=value``, older ``--flag`` and
``--key value`` spellings read as the same keys, unknown keys listing the valid ones, one-line errors, and ``--help``
answering without importing torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from metricsearch.cli.args import Command, Option, PassedOn, UsageError, run_command
from metricsearch.inference.model_choice import MODEL_CHOICE_HELP, ModelChoice, given_choice
from tests.helpers import REPO_ROOT

SCRIPTS = sorted(path.name for path in (REPO_ROOT / "scripts").glob("*.py"))

EXAMPLE = Command(
    name="example",
    summary="An example command.",
    options={
        "index": Option(None, "the index folder", required=True),
        "k": Option(10, "number of results"),
        "scale": Option(1.5, "a number"),
        "epochs": Option(None, "whole number or none", type=int),
        "json": Option(False, "print JSON"),
        "dry_run": Option(False, "run nothing"),
        "extra": Option("", "overrides"),
    },
    passed_on=PassedOn(("trainer.",), (("trainer.KEY=VALUE", "passed on"),)),
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_importing_torch(script):
    """``python -X importtime scripts/X.py --help`` prints the usage and never imports torch (nor lightning)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", f"scripts/{script}", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: python scripts/{script} key=value"), result.stdout[:500]
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", result.stderr, re.MULTILINE)
    assert imported, result.stderr[-2000:]  # the import log is there, so an empty match below means something
    heavy = [name for name in imported if name.split(".")[0] in ("torch", "lightning")]
    assert not heavy, f"scripts/{script} --help imports {heavy[:5]}"


def test_key_value_is_the_convention_and_old_spellings_read_as_the_same_keys():
    args = EXAMPLE.parse(["index=/x", "k=3", "--json", "--dry-run", "--scale", "2", "--epochs=4", "--extra", ""])
    assert args.values == {
        "index": "/x",
        "k": 3,
        "scale": 2.0,
        "epochs": 4,
        "json": True,
        "dry_run": True,
        "extra": None,
    }
    same = EXAMPLE.parse(["--index", "/x", "k=3", "json=true", "dry_run=yes", "scale=2", "epochs=4", "extra="])
    assert same.values == args.values
    assert EXAMPLE.parse(["index=/x", "json=false", "--json=off", "epochs=none"])["json"] is False
    assert EXAMPLE.parse(["index=/x"]).values["epochs"] is None
    # A value may itself hold '=' (an override passed as one option's value).
    assert EXAMPLE.parse(["index=/x", "--extra", "backbone=resnet18 seed=1"])["extra"] == "backbone=resnet18 seed=1"


def test_passed_on_overrides_keep_their_order():
    args = EXAMPLE.parse(["trainer.devices=2", "index=/x", "trainer.num_nodes=1"])
    assert args.overrides == ["trainer.devices=2", "trainer.num_nodes=1"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index=/x", "qurey=a.jpg"], "unknown option 'qurey' for example; valid: index, k, scale, epochs, json"),
        (["index=/x", "--qurey", "a.jpg"], "unknown option 'qurey' for example; valid: index, k,"),
        (["index=/x", "trainer"], "arguments are key=value, got 'trainer'"),
        (["index=/x", "k=three"], "k=three is not a valid int"),
        (["index=/x", "json=maybe"], "json=maybe is not true or false"),
        (["index=/x", "--k"], "--k needs a value: --k VALUE or k=VALUE"),
        (["k=3"], "example needs index="),
    ],
)
def test_usage_errors_name_the_problem(argv, message):
    with pytest.raises(UsageError) as refused:
        EXAMPLE.parse(argv)
    assert message in str(refused.value)
    if "unknown option" in message:
        assert "trainer.KEY=VALUE" in str(refused.value)  # what is passed on is listed too


def test_user_errors_are_one_line_with_exit_status_two(capsys):
    assert run_command(EXAMPLE, ["k=1"], lambda args: 0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: example needs index=") and "--help" in err

    def fails(args):
        raise FileNotFoundError("no such file:\n  /x/index")

    assert run_command(EXAMPLE, ["index=/x"], fails, {FileNotFoundError: 2}) == 2
    assert capsys.readouterr().err == "error: no such file: /x/index\n"
    assert run_command(EXAMPLE, ["index=/x"], lambda args: 1) == 1
    with pytest.raises(KeyError):  # anything else is a bug, and keeps its traceback
        run_command(EXAMPLE, ["index=/x"], lambda args: {}["missing"], {FileNotFoundError: 2})


def test_help_shows_the_key_value_form(capsys):
    assert run_command(EXAMPLE, ["index=/x", "--help"], lambda args: pytest.fail("ran")) == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python scripts/example.py key=value")
    assert re.search(r"^  k=\s+number of results \(default: 10\)$", usage, re.MULTILINE)
    assert re.search(r"^  json=\s+print JSON \(default: false; --json sets it\)$", usage, re.MULTILINE)
    assert "--dry-run sets it" in usage and "(required)" in usage and "trainer.KEY=VALUE" in usage


def test_one_definition_of_the_model_choice():
    assert set(MODEL_CHOICE_HELP) == set(ModelChoice.__annotations__)
    assert given_choice({"ckpt": "a.ckpt", "model": None}) == {"ckpt": "a.ckpt"}
    with pytest.raises(TypeError, match="unknown model choice"):
        given_choice({"checkpoint": "a.ckpt"})  # type: ignore[typeddict-unknown-key]


def test_the_spellings_readme_and_makefile_use_mean_what_key_value_says():
    from metricsearch.cli.benchmarks import BENCHMARK
    from metricsearch.cli.data import PREPARE_DATA
    from metricsearch.cli.reproduce import REPRODUCE
    from metricsearch.cli.search import SEARCH

    old = BENCHMARK.parse(["--quick", "--sections", "eval", "--out", "DIR", "--data-dir", "/tmp/d"])
    assert old.values == BENCHMARK.parse(["quick=true", "sections=eval", "out=DIR", "data_dir=/tmp/d"]).values
    # What `make reproduce` runs with its variables empty and set.
    make = ["--datasets", "synthetic,", "--losses", "triplet", "--seeds", "0,1", "--epochs", "2", "--extra", ""]
    same = ["datasets=synthetic,", "losses=triplet", "seeds=0,1", "epochs=2", "extra="]
    assert REPRODUCE.parse(make).values == REPRODUCE.parse(same).values
    assert REPRODUCE.parse(["--dry-run", "--aggregate-only", "--results-dir", "r"])["results_dir"] == "r"
    prepare = PREPARE_DATA.parse(["data=cub", "--info", "--mirror", "http://host/x?a=b", "--timeout", "5"])
    assert prepare["info"] is True and prepare["mirror"] == "http://host/x?a=b" and prepare["timeout"] == 5.0
    assert prepare.overrides == ["data=cub"]
    assert SEARCH.parse(["index=I", "query=Q", "k=10", "--json", "model=model.onnx"])["json"] is True


@pytest.mark.parametrize(
    ("target", "default", "committed"),
    [("compare", "outputs/compare", "results/compare"), ("reproduce", "outputs/reproduce", "results")],
)
def test_make_writes_a_users_run_to_an_ignored_folder_and_the_committed_results_only_when_named(
    target, default, committed
):
    def command(*variables: str) -> str:
        printed = subprocess.run(
            ["make", "-n", "-o", "install", target, *variables],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return " ".join(printed.replace("\\\n", " ").split())

    assert f'--results-dir "{default}"' in command("LOSSES=triplet", "TRIALS=2")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{default}/x.csv"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, f"{default} is not git-ignored"
    assert f'--results-dir "{committed}"' in command(f"RESULTS_DIR={committed}")
