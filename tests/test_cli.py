"""The ``tools`` command line checks its arguments before a command runs; its help pages; study scale-file checks.

Fire calls a command first and complains about arguments it could not use afterwards, so a misspelled flag used to
run the command with its defaults (``data phantom --n_case 2`` wrote 20 cases, then failed). These tests run
``python -m tools`` as a user would (a few as a subprocess, the rest through :func:`tools.cli.main` with an argv)
and replace the commands' workers by recorders where a command must not run, so a regression fails at once.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import studies
from tools.cli import PROG, Cli, main
from tools.cli_args import help_page, parse_docstring, prepare, subcommands

REPO = Path(__file__).resolve().parents[1]


def run_tools(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tools", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)  # fmt: skip


def refused(argv: list[str], capsys) -> str:
    """Run the command line, require exit status 2; return what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.fixture()
def calls(monkeypatch):
    """Replace the workers behind the commands by recorders: name -> list of (args, kwargs)."""
    import tools.bundle_check
    import tools.phantom
    import tools.prep
    import tools.synthesize

    recorded: dict[str, list] = {}

    def recorder(name):
        def record(*args, **kwargs):
            recorded.setdefault(name, []).append((args, kwargs))
            return {}

        return record

    monkeypatch.setattr(tools.phantom, "make_dataset", recorder("make_dataset"))
    monkeypatch.setattr(tools.prep, "prepare_dataset", recorder("prepare_dataset"))
    monkeypatch.setattr(tools.synthesize, "synthesize", recorder("synthesize"))
    monkeypatch.setattr(tools.bundle_check, "check_bundle_cli", recorder("check_bundle_cli"))
    return recorded


def all_commands(component=None, path=()):
    """(path, method) of every command of ``python -m tools``."""
    for name, member in subcommands(component or Cli()).items():
        if callable(member):
            yield [*path, name], member
        else:
            yield from all_commands(member, (*path, name))


# ---------------------------------------------------------------------------------------------------------------
# refused before anything runs


def test_misspelled_flag_is_refused_before_anything_is_written(tmp_path):
    """The issue's command, as a subprocess: exit 2, the nearest and the valid flags, no output folder."""
    done = run_tools("data", "phantom", "--out", "X", "--n_case", "2", "--shape", "32,32,16", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "python -m tools data phantom: unknown flag --n_case; did you mean --n_cases?" in done.stderr
    assert "valid flags: --out, --n_cases, --seed, --shape, --spacing," in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "X").exists() and list(tmp_path.iterdir()) == []


def test_unknown_flag_of_data_prepare_is_refused(tmp_path, capsys, calls):
    err = refused(["data", "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--modee", "pancreas"], capsys)
    assert "data prepare: unknown flag --modee; did you mean --mode?" in err and "--hu_window" in err
    assert calls == {} and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "phantom", "--out"], "flag --out needs a value: --out VALUE or --out=VALUE"),
        (["data", "phantom", "--n_cases", "--seed", "1"], "flag --n_cases needs a value"),
        (["data", "phantom", "--out", "a", "--out", "b"], "flag --out is given twice"),
        (["data", "phantom", "-n", "2"], "unknown flag -n: write flags in full (--n_cases)"),
        (["data", "phantom", "--noout"], "unknown flag --noout; did you mean --out?"),
        (["data", "prepare", "src"], "missing required argument: OUT (or --out)"),
        (["data", "list", "a", "b", "c"], "too many arguments: 'c' (it takes SOURCE VALIDATE)"),
        (["data", "list", "a", "--validate", "b"], "flag --validate is on or off"),
        (["data", "list", "a", "yes please"], "VALIDATE is on or off (True/False): got 'yes please'"),
        (["synthesize", "vae_ct", "src", "out", "--nooverrides"], "unknown flag --nooverrides"),
        (["check_bundle", "--dataset_dir", "d"], "missing required argument: BUNDLE_DIR"),
    ],
)
def test_bad_command_lines_are_refused_naming_the_problem(argv, message, capsys, calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(argv, capsys)
    assert message in err, err
    assert f"see: {PROG} {' '.join(argv[:2] if argv[0] == 'data' else argv[:1])} --help" in err
    assert calls == {} and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dat", "phantom"], "python -m tools: unknown command 'dat'; did you mean 'data'?"),
        (["data", "phantm"], "python -m tools data: unknown command 'phantm'; did you mean 'phantom'?"),
        (["syntesize", "a", "b", "c"], "did you mean 'synthesize'?"),
        (["--out", "x"], "python -m tools: expected a command before --out"),
        (["study", "--scale", "demo"], "python -m tools study: expected a command before --scale"),
    ],
)
def test_unknown_commands_are_refused_with_the_nearest_name(argv, message, capsys, calls):
    err = refused(argv, capsys)
    assert message in err, err
    assert "commands: " in err and calls == {}


# ---------------------------------------------------------------------------------------------------------------
# valid command lines still run, with fire's value parsing


def test_tiny_phantom_runs_with_equals_and_hyphen_spellings(tmp_path, capsys):
    out = tmp_path / "phantom"
    main(["data", "phantom", f"--out={out}", "--n-cases", "1", "--shape", "24,24,12", "--tumor_fraction=1"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] + meta.get("numTest", 0) == 1
    assert str(out) in capsys.readouterr().out


def test_values_reach_the_command_parsed_as_before(calls, capsys):
    main(["data", "phantom", "--out", "X", "--shape", "32,32,16", "--tumor_radius_mm", "5,9"])
    (_, kwargs), = calls["make_dataset"]  # fmt: skip
    assert kwargs["shape"] == (32, 32, 16) and kwargs["spacing"] is None and kwargs["tumor_radius_mm"] == (5.0, 9.0)
    main(["data", "prepare", "S", "O", "--hu_window", "-175,250", "--out_shape=16,16,16", "--sections", "training"])
    (args, kwargs), = calls["prepare_dataset"]  # fmt: skip
    assert args == ("S", "O") and kwargs["hu_window"] == (-175.0, 250.0) and kwargs["out_shape"] == (16, 16, 16)
    assert kwargs["sections"] == ("training",)
    main(["synthesize", "vae_ct", "S", "O", "--overrides", '{"a": 1}', "--noprogress", "--max-items", "2"])
    (args, kwargs), = calls["synthesize"]  # fmt: skip
    assert args == ("vae_ct", "S", "O") and kwargs["overrides"] == {"a": 1}
    assert kwargs["progress"] is False and kwargs["max_items"] == 2
    main(["check_bundle", "bundles/seg_unet3d", "--dataset_dir", "d", "--max-epochs=3", "--amp", "--nocache"])
    (args, kwargs), = calls["check_bundle_cli"]  # fmt: skip
    assert args == ("bundles/seg_unet3d",) and kwargs == {"schema": None, "dataset_dir": "d", "max_epochs": 3,
                                                          "amp": True, "cache": False}  # fmt: skip


def test_checked_command_line_is_rebuilt_for_fire():
    cli = Cli()
    assert prepare(cli, ["data", "list", "X", "--novalidate"], PROG) == ["data", "list", "X", "--validate=False"]
    assert prepare(cli, ["data", "list", "X", "true"], PROG) == ["data", "list", "X", "True"]
    assert prepare(cli, ["data", "list", "--validate", "--source", "X"], PROG) == [
        "data", "list", "--validate=True", "--source=X"
    ]  # fmt: skip
    # the command line the demo and torchrun start (python -m tools study <name> --out O --scale S)
    assert prepare(cli, ["study", "tumor_size", "--out", "O", "--scale", "s.json"], PROG) == [
        "study", "tumor_size", "--out=O", "--scale=s.json"
    ]  # fmt: skip
    assert prepare(cli, ["check-bundle", "B", "--trace-me", "1", "--", "--trace"], PROG) == [
        "check_bundle", "B", "--trace_me=1", "--", "--trace"
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# help pages


def test_help_has_no_banner_complete_texts_and_true_defaults(tmp_path):
    done = run_tools("synthesize", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert not done.stdout.startswith("INFO") and "Showing help" not in done.stdout
    text = " ".join(done.stdout.split())  # the page is wrapped to the terminal's width
    assert ("ldm_abdomen wants a folder made by `data prepare --mode full --hu_window None` (or pass --overrides "
            "'{\"crop_mode\": \"none\"}').") in text  # fmt: skip
    assert "usage: python -m tools synthesize BUNDLE SOURCE OUT [flags]" in text
    assert "--progress / --noprogress (default: --progress)" in text
    done = run_tools("data", "phantom", "-h", cwd=tmp_path)
    assert done.returncode == 0 and "--spacing VALUE (default: fit)" in " ".join(done.stdout.split())
    assert "None" not in done.stdout.split("--spacing")[1].split("--phase")[0]
    assert list(tmp_path.iterdir()) == []


def test_group_and_top_level_help_list_their_commands(capsys):
    main(["--help"])
    top = capsys.readouterr().out
    assert top.startswith("Tools for the pancreas CT synthesis bundles.")
    for name in ("data", "study", "synthesize", "check_bundle", "demo"):
        assert f"\n  {name} " in top
    main(["data"])
    page = capsys.readouterr().out
    assert "usage: python -m tools data <command>" in page and "  phantom " in page and "  quartiles " in page
    main(["data", "--", "--help"])
    assert capsys.readouterr().out == page


def test_every_command_documents_every_argument_and_states_true_defaults():
    """Each parameter has its text in the docstring (and each text a parameter); a default the text states is
    the signature's; every help page renders."""
    for path, method in all_commands():
        doc = parse_docstring(method)
        params = [p for p in inspect.signature(method).parameters.values()]
        assert doc.summary, path
        assert sorted(doc.args) == sorted(p.name for p in params), path
        for param in params:
            text = doc.args[param.name]
            assert text, (path, param.name)
            if param.default not in (None, inspect.Parameter.empty) and "default" in text:
                shown = ",".join(map(str, param.default)) if isinstance(param.default, tuple) else str(param.default)
                assert shown in text, (path, param.name, param.default, text)
        page = help_page(path, method, PROG)
        shown = [f"--{p.name}" if p.kind != p.VAR_KEYWORD else "--KEY VALUE" for p in params]
        assert "default: None" not in page and all(flag in page or flag[2:].upper() in page for flag in shown), path


def test_parse_docstring_joins_continuation_lines():
    def command(source, out=None):
        """Do a thing.

        More words.

        Args:
            source: first line
                second line (default x).
            out: one line.
        """

    doc = parse_docstring(command)
    assert doc.summary == "Do a thing." and doc.description == ["More words."]
    assert doc.args == {"source": "first line second line (default x).", "out": "one line."}


# ---------------------------------------------------------------------------------------------------------------
# study scale files and the study commands' arm lists


def scale_file(folder: Path, **settings) -> Path:
    path = folder / "scale.json"
    path.write_text(json.dumps({"base": "demo", **settings}))
    return path


@pytest.mark.parametrize(
    "settings, study, message",
    [
        ({"arms": {"ratio": ["real only"]}}, "ratio",
         "arms.ratio: unknown ratio generator 'real only' ('real only' is the baseline arm, which always runs); "
         "known: VAE, DM"),
        ({"arms": {"ratio": ["VAE+GAN"]}}, "ratio", "unknown ratio generator 'GAN' in 'VAE+GAN'; known: VAE, DM"),
        ({"arms": {"ratios": ["VAE"]}}, "ratio", "arms: unknown study 'ratios' (did you mean 'ratio'?); known: ratio,"),
        ({"arms": {"tumor_size": ["larg"]}}, "tumor_size",
         "unknown tumor_size arm 'larg' (did you mean 'large'?); known: tiny, small, medium, large, mixed"),
        ({"arms": {"tumor_size": "large"}}, "tumor_size", "expected a non-empty list of tumor_size arm names"),
        ({"arms": {"crop_context": ["pancreatic"]}}, "crop_context", "known: full, semi, pancreas"),
        ({"seed": [0]}, "label_noise", "unknown setting 'seed' (did you mean 'seeds'?); known: arms, base,"),
        ({"base": "tiny"}, "ratio", "unknown base scale 'tiny'; known: demo, small, paper or a JSON scale file"),
        ({"seg": [1, 2]}, "ratio", "setting 'seg' must be a JSON object like the base scale's"),
    ],
)  # fmt: skip
def test_scale_file_with_unknown_names_is_refused_at_start(settings, study, message, tmp_path):
    scale = scale_file(tmp_path, **settings)
    out = tmp_path / "studies"
    with pytest.raises(ValueError) as error:
        studies.run_study(study, out, scale=str(scale), progress=False)
    assert str(error.value).startswith(f"{scale}: ") and message in str(error.value), str(error.value)
    assert not out.exists()


def test_scale_file_that_is_not_json_is_refused(tmp_path):
    scale = tmp_path / "scale.json"
    scale.write_text('{"base": "demo",')
    with pytest.raises(ValueError, match=f"{scale}: not a JSON scale file"):
        studies.scale_settings(scale)


def test_valid_scale_files_pass(tmp_path):
    from tests.test_studies import TINY_SCALE

    arms = {"ratio": ["VAE", "VAE+DM"], "tumor_size": ["large"], "label_noise": ["low"], "crop_context": ["semi"],
            "tumor_families": ["cellular"]}  # fmt: skip
    scale = scale_file(tmp_path, **{**TINY_SCALE, "arms": arms})
    ratio = studies.RatioStudy(tmp_path, str(scale))
    assert [a for a, _ in ratio.arms()] == ["real only", "VAE 100:0", "VAE 50:50", "VAE 25:75", "VAE+DM 100:0",
                                            "VAE+DM 50:50", "VAE+DM 25:75"]  # fmt: skip
    assert [a for a, _ in studies.TumorFamiliesStudy(tmp_path, str(scale)).arms()] == ["none", "cellular"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "ratio", "--generators", "VAE,VAEDM"], "--generators: unknown ratio generator 'VAEDM'"),
        (["study", "ratio", "--synthetic", "vae=a.json"], "--synthetic without --generators (default VAE,DM,VAE+DM)"),
        (["study", "tumor_size", "--sizes", "tiny,huge"], "--sizes: unknown tumor_size arm 'huge'"),
        (["study", "tumor_size", "--family", "diffusion"], "--family: unknown tumor_families family 'diffusion'"),
        (["study", "tumor_families", "--families", "difftumour"], "'difftumour' (did you mean 'difftumor'?)"),
    ],
)
def test_study_arm_lists_on_the_command_line_are_checked_at_start(argv, message, tmp_path):
    out = tmp_path / "studies"
    with pytest.raises(ValueError) as error:
        main([*argv, "--out", str(out)])
    assert message in str(error.value) and "known: " in str(error.value)
    assert not out.exists()
    main(["study", "ratio", "--help"])  # the refusal leaves the command line usable


@pytest.mark.parametrize("seeds, expected", [("0", [0]), ("0,1,2", [0, 1, 2]), ("3", [3])])
def test_study_seeds_may_be_one_number(seeds, expected, tmp_path, monkeypatch):
    """`--seeds 0` reaches the command as the int 0 (fire parses it), not as text: it must mean the seed list [0]."""
    calls = []
    monkeypatch.setattr(studies, "run_study", lambda name, out, **kw: calls.append((name, kw["seeds"])))
    main(["study", "label_noise", "--out", str(tmp_path), "--scale", "demo", "--seeds", seeds])
    assert calls == [("label_noise", expected)]
