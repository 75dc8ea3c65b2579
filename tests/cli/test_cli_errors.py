"""What every subcommand shares: one-line errors for paths the system refuses, a quiet end on a closed pipe,
unknown options named with their subcommand's help, negative numbers as option values, and honest help texts."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli  # tests/cli/conftest.py

import palitorch.cli.run


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/data/x.png"),
     "palitorch run: error: cannot use /data/x.png: Permission denied (check the path and its permissions)\n"),
    (OSError(28, "No space left on device"),
     "palitorch run: error: No space left on device (free some space, or write elsewhere)\n"),
])
def test_an_os_error_about_a_path_is_one_line(error, line, monkeypatch, capsys):
    """The safety net under every command: whatever check missed it, a path the system refuses is one line."""

    def fail(args):
        raise error

    monkeypatch.setattr(palitorch.cli.run, "run", fail)
    rc, out, err = cli(["run", "--image", "x.png", "--prompt", "caption en"], capsys)
    assert (rc, out, err) == (2, "", line)


def test_other_errors_keep_their_traceback(monkeypatch, capsys):
    """A bug stays visible: only OS errors that name a path (or a full disk) become one line."""

    def fail(args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(palitorch.cli.run, "run", fail)
    with pytest.raises(OSError, match="Invalid argument"):
        cli(["run", "--image", "x.png", "--prompt", "caption en"], capsys)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 2457600000000000 bytes"),
    MemoryError(),  # (no message)
])
def test_out_of_memory_is_one_line_that_says_what_to_lower(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(palitorch.cli.run, "run", fail)
    rc, out, err = cli(["run", "--image", "x.png", "--prompt", "caption en"], capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("palitorch run: error: out of memory (") and "lower --batch-size" in err


def test_a_runtime_error_that_is_not_memory_keeps_its_traceback(monkeypatch, capsys):
    def fail(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(palitorch.cli.run, "run", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli(["run", "--image", "x.png", "--prompt", "caption en"], capsys)


def test_ctrl_c_while_the_command_starts_is_quiet():
    """Ctrl-C in the seconds torch takes to import (the moment one notices a typo in the command) printed the
    import's traceback: `import palitorch` no longer imports torch, and the entry point guards the rest."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "palitorch", "run", "--image", "x.png", "--prompt", "hi"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and out == "", err
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)


def test_import_palitorch_does_not_import_torch():
    code = ("import sys, palitorch; assert 'torch' not in sys.modules; palitorch.load; assert 'torch' in sys.modules; "
            "palitorch.model.kernels.use_onednn")  # (subpackages as attributes, as the README uses them)
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


class ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("mode", [["--stream"], ["--json"], []])
def test_a_closed_pipe_ends_quietly(mode, fake_pipe, images, monkeypatch, capsys):
    """`palitorch run ... | head -c 1`: the reader left; exit 141 as SIGPIPE would, without a traceback."""
    fake_pipe(lambda im, p: "a red square")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    rc, _, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", *mode], capsys)
    assert rc == 141 and err == ""


def test_a_closed_pipe_in_a_subprocess(pg1, images):
    """The real thing: the reader is gone before the answer is written; nothing on stderr, not even Python's
    'Exception ignored' at exit."""
    p = subprocess.Popen([sys.executable, "-m", "palitorch", "run", "--model", str(pg1[0]), "--image",
                          str(images / "red.png"), "--prompt", "caption en", "--max-new-tokens", "3", "--stream"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == ""


def test_an_unknown_option_names_its_subcommand_help(capsys):
    for argv, prog in ((["chat", "--image", "x", "--top-logprobs", "2"], "palitorch chat"),
                       (["data", "easyvqa", "--out", "x", "--bogus"], "palitorch data easyvqa")):
        rc, _, err = cli(argv, capsys)
        assert rc == 2 and err.startswith(f"{prog}: error: unrecognized arguments: ")
        assert err.endswith(f"(see {prog} --help)\n") and err.count("\n") == 1, err


def test_a_misspelt_option_is_named_with_the_nearest_one(capsys):
    """argparse reports a missing required option before an unknown one: `run --imgae x` said --image was
    required. The misspelt option is named, with the nearest option when one is close; a prefix of an option is
    one (argparse takes it)."""
    for argv, said in ((["run", "--imgae", "x", "--prompt", "p"], "unrecognized arguments: --imgae; did you mean "
                                                                   "--image?"),
                       (["batch", "--inptu", "a", "--output", "b"], "unrecognized arguments: --inptu; did you mean "
                                                                     "--input?"),
                       (["run", "--image", "x", "--prompt", "p", "--max-new-tokns", "3"],
                        "unrecognized arguments: --max-new-tokns 3; did you mean --max-new-tokens?"),
                       (["run", "--imag", "x"], "the following arguments are required: --prompt"),
                       (["run", "--image", "x", "--prompt", "p", "--zzz"], "unrecognized arguments: --zzz (see")):
        rc, _, err = cli(argv, capsys)
        assert rc == 2 and said in err and err.count("\n") == 1, err


@pytest.mark.parametrize("value, expected", [("-1e-3", -1e-3), ("-2E+1", -20.0), ("-.5", -0.5), ("-1", -1.0)])
def test_negative_numbers_in_any_spelling_are_values(value, expected, fake_pipe, images, capsys):
    """argparse takes -1 and -.5 for values but -1e-3 for an option (so `--length-penalty -1e-3` had no value)."""
    pipe = fake_pipe(lambda im, p: "ok")
    rc, _, err = cli(["run", "--image", images / "red.png", "--prompt", "caption en", "--num-beams", "2",
                      "--length-penalty", value], capsys)
    assert rc == 0, err
    assert pipe.calls[0][3]["length_penalty"] == expected


def test_help_says_what_the_output_holds(capsys):
    def help_of(command):
        rc, out, _ = cli([command, "--help"], capsys)
        assert rc == 0
        return " ".join(out.split())

    assert "top_logprobs with --top-logprobs K" in help_of("run")
    text = help_of("batch")
    assert "appended" not in text and "put in input order at the end" in text and "error lines run again" in text


def test_a_data_out_that_cannot_be_made(capsys):
    """mkdir under /proc fails even for root: named before any work, with the option at fault ([train] out:
    tests/train/test_train_config.py)."""
    if not Path("/proc/1").is_dir():
        pytest.skip("needs Linux's /proc")
    rc, _, err = cli(["data", "easyvqa", "--out", "/proc/1/x", "--limit", "1"], capsys)
    assert rc == 2 and err == ("palitorch data: error: --out '/proc/1/x': cannot write a folder in '/proc/1' "
                               "(No such file or directory): choose another path\n")


def test_version(capsys):
    import palitorch

    with pytest.raises(SystemExit) as e:
        palitorch.cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"palitorch {palitorch.__version__}\n"
