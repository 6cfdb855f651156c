"""Probes: what the user sees when the input is wrong, for every command that needs no cluster and
no training run. Each row is (argv, exit code, a regex the one stderr line matches); every bad
input gives exactly one non-empty stderr line starting with `error:`, no traceback, and its exit
code (2 for bad input). Probing another command or input is adding a row.

In-process (ctrlnet.cli.main, as the `ctrlnet` script runs it) and quick: nothing here trains,
imports torch or reaches a cluster. Each probe has a deadline, so an input that would never
finish loading (an alias bomb) fails its row instead of hanging the suite.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from ctrlnet.config.bounds import MAX_RESOLUTION, MAX_ROWS
from ctrlnet.config.loading import MAX_FILE_BYTES
from testkit.cli import run_in_process

ALIAS_BOMB = "\n".join(
    [
        "train:",
        '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"  {n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)
"""9 levels of 9 aliases under `train`: ten lines that stand for about 10**9 strings once expanded
(the credential scan of the train section walked them all, and never finished)."""

FILES = {
    # name -> (file name, content): written into tmp_path; `{name}` in a row's argv is its path.
    "bomb": ("bomb.yaml", ALIAS_BOMB),
    "notyaml": ("notyaml.yaml", "train: [unclosed\n  loop: {\n"),
    "list": ("list.yaml", "- train\n- cluster\n"),
    "large": ("large.yaml", "# padding\n" * (MAX_FILE_BYTES // 10 + 1)),
    "selfref": ("selfref.yaml", "train: &t {output: x, model: *t}\n"),
    "deep": ("deep.yaml", "[" * 100_000 + "]" * 100_000),
    "manifest_bomb": ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n" + ALIAS_BOMB[7:]),
}

BAD_FILES = [
    ("bomb", r"config file .*bomb\.yaml is refused: .*more than 100000 values with its aliases expanded"),
    ("notyaml", r"config file .*notyaml\.yaml is not valid YAML at line \d+"),
    ("list", r"config file .*list\.yaml must hold a mapping"),
    ("large", r"config file .*large\.yaml is larger than 1024 KiB"),
    ("selfref", r"config file .*selfref\.yaml is refused: a value contains itself"),
    ("deep", r"config file .*deep\.yaml is refused: its values are nested too deeply"),
]

BAD_SETTINGS = [
    # (--set, the error line's regex)
    (
        "train.data.resolution=100000",
        rf"train\.data\.resolution: Input should be less than or equal to {MAX_RESOLUTION}",
    ),
    ("train.data.synthetic_rows=1000000000000", rf"train\.data\.synthetic_rows: .*less than or equal to {MAX_ROWS}"),
    ("train.loop.max_steps=10000000000000", r"train\.loop\.max_steps: .*less than or equal to"),
    ("train.loop.batch_size=1000000", r"train\.loop\.batch_size: .*less than or equal to"),
    ("train.data.num_workers=100000", r"train\.data\.num_workers: .*less than or equal to"),
    ("train.validation.num_images=100000", r"train\.validation\.num_images: .*less than or equal to"),
    ("train.validation.num_inference_steps=100000", r"train\.validation\.num_inference_steps: .*less than or equal"),
    ("train.output=" + "x" * 5000, r"train\.output: String should have at most 4096 characters"),
    ("cluster.nodes=1000000", r"cluster\.nodes: .*less than or equal to"),
    ("train.optim.learning_rate=1e309", r"train\.optim\.learning_rate: Input should be a finite number"),
    ("train.optim.learning_rate=nan", r"train\.optim\.learning_rate: Input should be a finite number"),
    ("train.optim.lr_power=-inf", r"train\.optim\.lr_power: Input should be a finite number"),
    ("train.optim.lr_power=.inf", r"train\.optim\.lr_power: Input should be a finite number"),
    ("train.optim.weight_decay=.nan", r"train\.optim\.weight_decay: Input should be a finite number"),
    ("train.checkpoint.upload_timeout_s=1e400", r"train\.checkpoint\.upload_timeout_s: .*finite number"),
]

# The commands that load a job config (-f / --set) before they need a cluster or a GPU.
CONFIG_COMMANDS = [["config", "show"], ["render"], ["validate"], ["train"], ["precompute"]]

USAGE = [
    (["train", "--nproc", "0"], r"^error: ctrlnet train: Invalid value for '--nproc'"),
    (["generate", "--steps", "0"], r"^error: ctrlnet generate: Invalid value for '--steps'"),
    (["generate", "--num-images", "0"], r"^error: ctrlnet generate: Invalid value for '--num-images'"),
    (["generate"], r"^error: ctrlnet generate: Missing option '--base'"),
    (["data", "synth-fill", "--rows", "0", "--out", "{tmp}"], r"^error: ctrlnet data synth-fill: .*'--rows'"),
    (["data", "synth-fill", "--resolution", "4", "--out", "{tmp}"], r"'--resolution'"),
    (["data", "synth-fill"], r"^error: ctrlnet data synth-fill: Missing option '--out'"),
    (["model", "init"], r"^error: ctrlnet model init: Missing option '--out'"),
    (["train", "--max-steps", "many"], r"^error: ctrlnet train: Invalid value for '--max-steps'"),
    (["trian"], r"^error: ctrlnet: No such command 'trian'\. Did you mean 'train'\?"),
    (["config", "shwo"], r"^error: ctrlnet config: No such command 'shwo'"),
    (["data", "synth"], r"^error: ctrlnet data: No such command 'synth'"),
    (["--bogus"], r"^error: ctrlnet: No such option: --bogus"),
    (["-v", "-q", "config", "show"], r"^error: give -v or -q, not both$"),
    (["train", "-f"], r"^error: .*Option '-f' requires an argument"),
    (["render"], r"^error: no job config: pass one with -f"),
    (
        ["validate", "--manifests", "{manifest_bomb}"],
        r"^error: .*cm\.yaml is refused: it holds more than 1000000 values",
    ),
    (["validate", "--manifests", "{deep}"], r"^error: .*deep\.yaml is refused: its values are nested too deeply"),
]

BOUNDS = [
    (["train", "--resolution", "100000"], r"train\.data\.resolution: .*less than or equal to 4096"),
    (["train", "--resolution", "100"], r"train\.data\.resolution: must be a multiple of 8"),
    (["train", "--batch-size", "10000000"], r"train\.loop\.batch_size: .*less than or equal to"),
    (["train", "--max-steps", str(10**12)], r"train\.loop\.max_steps: .*less than or equal to"),
    (
        ["data", "synth-fill", "--resolution", "100000", "--out", "{tmp}"],
        r"^error: ctrlnet data synth-fill: Invalid value for '--resolution'.*4096",
    ),
    (
        ["data", "synth-fill", "--rows", str(10**12), "--out", "{tmp}"],
        r"^error: ctrlnet data synth-fill: Invalid value for '--rows'",
    ),
]


def _rows() -> list:
    rows = [pytest.param(argv, 2, regex, id=" ".join(argv)[:60]) for argv, regex in USAGE + BOUNDS]
    for command in CONFIG_COMMANDS:
        name = " ".join(command)
        for file, regex in BAD_FILES:
            rows.append(pytest.param([*command, "-f", "{" + file + "}"], 2, regex, id=f"{name} -f {file}"))
        for setting, regex in BAD_SETTINGS:
            rows.append(pytest.param([*command, "--set", setting], 2, regex, id=f"{name} --set {setting[:40]}"))
    return rows


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys):
    """argv -> (exit code, stdout, stderr) of the `ctrlnet` script, in this process."""
    monkeypatch.delenv("CTRLNET_VERBOSITY", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping of any help text
    monkeypatch.chdir(tmp_path)
    paths = {}
    for name, (filename, content) in FILES.items():
        paths[name] = str(tmp_path / filename)
        Path(paths[name]).write_text(content, encoding="utf-8")

    def run(argv: list[str]) -> tuple[int, str, str]:
        argv = [a.format(tmp=str(tmp_path / "out"), **paths) if "{" in a else a for a in argv]
        proc = run_in_process(argv, monkeypatch=monkeypatch, capture=capsys, cwd=tmp_path)
        return proc.returncode, proc.stdout, proc.stderr

    yield run
    logging.captureWarnings(False)  # the CLI's callback turned it on for this process


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("argv", "code", "regex"), _rows())
def test_bad_input_is_one_error_line(run_cli, argv, code, regex):
    exit_code, out, err = run_cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err + out
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(regex, lines[0]), lines[0]
    assert exit_code == code, (exit_code, lines[0])


@pytest.mark.parametrize(
    ("argv", "stdout"),
    [
        (["--version"], r"^ctrlnet \S+\n$"),
        (["config", "show", "--set", "train.data.resolution=4096"], r"resolution: 4096"),
        (["config", "show", "--set", "train.optim.learning_rate=1e-4"], r"learning_rate: 0\.0001"),
        (["--show-completion", "bash"], r"_ctrlnet_completion"),
        (["--help"], r"--install-completion.*\n(.*\n)*.*--show-completion"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_good_input_says_nothing_on_stderr(run_cli, argv, stdout):
    exit_code, out, err = run_cli(argv)
    assert exit_code == 0 and err == "", err
    assert re.search(stdout, out), out


def test_help_of_a_group_without_a_command_is_the_help(run_cli):
    """`ctrlnet data` with no command shows its help (exit 2, as click does), not an error line."""
    exit_code, out, err = run_cli(["data"])
    assert exit_code == 2
    assert "synth-fill" in out + err and "error:" not in out + err


def test_every_command_refuses_an_unknown_option_in_one_line(run_cli):
    """Every command, the cluster ones included: an option it does not have fails in parsing,
    before anything connects."""
    import typer.main

    from ctrlnet.cli import app

    def leaves(command, path):
        subcommands = getattr(command, "commands", None)
        if not subcommands:
            yield path
            return
        for name, sub in subcommands.items():
            yield from leaves(sub, [*path, name])

    paths = list(leaves(typer.main.get_command(app), []))
    assert len(paths) > 10
    for path in paths:
        exit_code, out, err = run_cli([*path, "--no-such-option"])
        lines = [line for line in err.splitlines() if line.strip()]
        assert exit_code == 2 and len(lines) == 1 and "Traceback" not in err, (path, err)
        assert lines[0].startswith(f"error: ctrlnet {' '.join(path)}: No such option: --no-such-option"), lines[0]


@pytest.mark.filterwarnings("always")
def test_library_warnings_reach_stderr_only_with_verbose(run_cli, monkeypatch):
    """A library's Python warning (torch's, torchao's) never comes before the one error line;
    `ctrlnet -v` shows it, as a `warning:` line."""
    import warnings

    import ctrlnet.config
    from ctrlnet.errors import UserError

    def load_job_config(*args, **kwargs):
        warnings.warn("this API is deprecated", DeprecationWarning, stacklevel=1)
        raise UserError("the problem: the fix")

    monkeypatch.setattr(ctrlnet.config, "load_job_config", load_job_config)
    for argv in (["config", "show"], ["-q", "config", "show"]):
        exit_code, out, err = run_cli(argv)
        assert (exit_code, err) == (2, "error: the problem: the fix\n"), err
    exit_code, out, err = run_cli(["-v", "config", "show"])
    lines = err.splitlines()
    assert exit_code == 2 and lines[-1] == "error: the problem: the fix"
    assert any(line.startswith("warning: ") and "this API is deprecated" in line for line in lines[:-1]), err
