"""The command line (``python -m gradclip``, ``gradclip-bench``), as a new user
meets it. (The README's code blocks are run by tests/test_readme.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

from gradclip.bench import cli


def test_gradclip_bench_help_lists_every_subcommand(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for command in ("bench", "plot", "info"):
        assert re.search(rf"^\s+{command}\s", out, re.M), f"{command} missing from:\n{out}"


def test_output_to_a_closed_pipe_ends_quietly():
    # `python -m gradclip info | head -1`: the reader is gone before the output
    # is written; no BrokenPipeError traceback.
    proc = subprocess.Popen([sys.executable, "-m", "gradclip", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
