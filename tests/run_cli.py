"""`cli`: run `palitorch ARGV` in-process, for the CLI tests of tests/cli and tests/server."""

from palitorch.cli import main


def cli(argv, capsys):
    """Run `palitorch ARGV` in-process -> (exit code, stdout, stderr); argparse's SystemExit is caught."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
