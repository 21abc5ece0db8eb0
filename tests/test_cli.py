"""The command line (``python -m gradclip``, ``gradclip-bench``) and the
README's first code block, as a new user meets them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gradclip
from gradclip.bench import cli

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_the_readme_use_it_block_runs_as_written():
    text = README.read_text()
    section = text[text.index("## Use it"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README: Use it", "exec"), scope)  # noqa: S102 - the README's own example
    assert float(scope["total"]) > 0 and scope["norm"] > 0
    assert scope["gradclip"] is gradclip
