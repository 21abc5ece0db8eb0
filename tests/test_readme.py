"""Every code block of README.md, as a reader meets it.

Each ```python block runs as written in a fresh interpreter (``python -W error``,
the suite's own warning policy, in an empty temporary directory), and must exit
with status 0. A block that cannot run alone in one CPU process says why in an
HTML comment on the line just before its fence:

* ``<!-- readme-test: continues -->``: a fragment that goes on from the previous
  ```python block; it runs after that block (and whatever that one continues),
  in the same process.
* ``<!-- readme-test: skip (REASON) -->``: not run here; the reason is required,
  and a reason that says "run by PATH" must name files that exist. Skipped
  blocks are still compiled, and every ``gradclip`` name they use must exist
  and accept the keywords they pass.
* ``<!-- readme-test: needs cuda -->`` or ``needs MODULE[, MODULE]``: runs where
  a CUDA device / those modules are present, is skipped (with the reason) where not.

Several directives are separated by ``;``. ```bash blocks are not executed
(they install things); every command they name is checked to exist instead:
``python -m gradclip SUB --flag`` against ``SUB --help``, ``pip install ".[extra]"``
against pyproject.toml's extras, ``python -m pytest PATH`` against the checkout.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import gradclip

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK_TIMEOUT_S = 300

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    heading: str
    id: str
    directives: List[str]
    previous: Optional["Block"] = field(default=None, repr=False)  # the python block before this one

    @property
    def continues(self) -> bool:
        return "continues" in self.directives

    def program(self) -> str:
        """The block's code, preceded by the blocks it continues."""
        if self.continues and self.previous is not None:
            return self.previous.program() + "\n" + self.code
        return self.code


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-") or "top"


def _split_directives(text: str) -> List[str]:
    """'a; skip (x; y)' -> ['a', 'skip (x; y)']: ';' separates, except inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [p for p in parts + [current.strip()] if p]


def parse_readme(text: str) -> tuple:
    """(blocks, stray markers): the fenced blocks with their directives, and the
    line numbers of markers that do not sit just before a fence."""
    lines = text.splitlines()
    blocks: List[Block] = []
    stray: List[int] = []
    per_heading: Dict[str, int] = {}
    heading = "top"
    last_python: Optional[Block] = None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = i + 1
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            assert end < len(lines), f"README.md:{i + 1}: code block is never closed"
            lang = fence.group(1)
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            directives = _split_directives(marker.group(1)) if marker else []
            per_heading[heading] = per_heading.get(heading, 0) + 1
            block = Block(lang=lang, code="\n".join(lines[i + 1:end]) + "\n", line=i + 1, heading=heading,
                          id=f"{_slug(heading)}-{per_heading[heading]}", directives=directives,
                          previous=last_python if lang == "python" else None)
            blocks.append(block)
            if lang == "python":
                last_python = block
            i = end + 1
            continue
        if MARKER.match(line) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            stray.append(i + 1)
        heading_match = HEADING.match(line)
        if heading_match:
            heading = heading_match.group(1)
        i += 1
    return blocks, stray


BLOCKS, STRAY_MARKERS = parse_readme(README.read_text(encoding="utf-8"))
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]
BASH_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "sh", "shell", "console")]

# Checks appended to a block's program, by block id: what the block claims.
CLAIMS = {
    "use-it-1": "assert float(total) > 0 and norm > 0 and isinstance(norm, float)",
    "in-a-training-loop-1": "assert clip.last.step == 2 and len(clip.last.largest(2)) == 2",
}


def _skip_reason(directive: str) -> Optional[str]:
    m = re.fullmatch(r"skip\s*\((.*)\)", directive)
    return m.group(1).strip() if m else None


def _check_directives(block: Block) -> None:
    for d in block.directives:
        if d == "continues":
            assert block.previous is not None, f"{block.id}: 'continues', but no python block comes before it"
        elif d.startswith("skip"):
            reason = _skip_reason(d)
            assert reason, f"{block.id}: a skip must name its reason: 'skip (why)', got {d!r}"
            run_by = re.search(r"\brun by (.*)", reason)
            if run_by:
                paths = re.findall(r"[\w./-]+\.(?:py|sh)\b", run_by.group(1))
                assert paths, f"{block.id}: 'run by' names no file: {reason!r}"
                for path in paths:
                    assert (ROOT / path).is_file(), f"{block.id}: skipped as run by {path}, which does not exist"
        elif d.startswith("needs "):
            assert d[len("needs "):].strip(), f"{block.id}: 'needs' names nothing"
        else:
            raise AssertionError(f"{block.id}: unknown readme-test directive {d!r} "
                                 "(known: continues, skip (reason), needs cuda, needs MODULE)")


def _check_names(block: Block) -> None:
    """Static checks, also for skipped blocks: the code compiles, every
    gradclip attribute it uses exists, and gradclip callables accept the
    keywords it passes."""
    tree = ast.parse(block.code, filename=f"README.md:{block.line}")
    bound = {"gradclip": gradclip}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gradclip":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule, as the import statement would load it
                    importlib.import_module(f"{node.module}.{alias.name}")
                bound[alias.asname or alias.name] = getattr(module, alias.name)

    def resolve(node):
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if owner is None:
                return None
            assert hasattr(owner, node.attr), (
                f"{block.id} (README.md:{block.line + node.lineno}): {ast.unparse(node)} does not exist")
            return getattr(owner, node.attr)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node)
        if isinstance(node, ast.Call):
            target = resolve(node.func)
            if target is None or not callable(target) or isinstance(target, type(gradclip)):
                continue
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue
            try:
                signature = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            try:
                signature.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
            except TypeError as e:
                raise AssertionError(f"{block.id} (README.md:{block.line + node.lineno}): "
                                     f"{ast.unparse(node.func)}(...) does not accept these arguments: {e}") from None


def test_readme_has_code_blocks_and_no_stray_markers():
    assert len(PYTHON_BLOCKS) >= 5 and BASH_BLOCKS, "README parsing found too few blocks"
    assert not STRAY_MARKERS, f"readme-test markers not just before a fence: README.md lines {STRAY_MARKERS}"
    for block in BLOCKS:
        if block.directives and block.lang != "python":
            raise AssertionError(f"{block.id}: readme-test markers apply to python blocks only")
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    assert set(CLAIMS) <= {b.id for b in PYTHON_BLOCKS}, "CLAIMS names a block that no longer exists"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(block, tmp_path):
    _check_directives(block)
    _check_names(block)
    for d in block.directives:
        if _skip_reason(d):
            pytest.skip(f"README.md:{block.line}: {_skip_reason(d)}")
    chain = [block]
    while chain[-1].continues:
        chain.append(chain[-1].previous)
    for b in chain:
        for d in b.directives:
            if d == "needs cuda":
                torch = pytest.importorskip("torch")
                if not torch.cuda.is_available():
                    pytest.skip(f"README.md:{block.line}: needs a CUDA device")
            elif d.startswith("needs "):
                for module in re.split(r"[,\s]+", d[len("needs "):].strip()):
                    pytest.importorskip(module)
    program = block.program()
    # The interpreter must import the gradclip under test, not another copy.
    program += f"\nimport gradclip as _g\nassert _g.__file__ == {gradclip.__file__!r}, _g.__file__\n"
    if block.id in CLAIMS:
        program += CLAIMS[block.id] + "\n"
    script = tmp_path / "readme_block.py"
    script.write_text(program, encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-W", "error", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"README.md:{block.line} ({block.id}) exited with {proc.returncode}\n"
        f"--- program ---\n{textwrap.indent(program, '    ')}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------
# bash blocks: the commands they name exist
# --------------------------------------------------------------------------


def _extras() -> set:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.M | re.S)
        return set(re.findall(r"^(\w[\w-]*)\s*=", section.group(1), re.M)) if section else set()
    return set(tomllib.loads(text)["project"].get("optional-dependencies", {}))


def _commands(code: str) -> List[List[str]]:
    commands = []
    for line in code.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words:
                commands.append(words)
    return commands


def _help_text(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args, "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, f"python -m {' '.join(args)} --help failed:\n{proc.stderr}"
    return proc.stdout


def _check_command(words: List[str], where: str) -> None:
    if words[0] == "pip" or words[:3] == ["python", "-m", "pip"]:
        args = words[1:] if words[0] == "pip" else words[3:]
        assert args and args[0] == "install", f"{where}: only 'pip install' is checked, got {words}"
        for arg in args[1:]:
            local = re.fullmatch(r"(\.|\./[\w./-]*)(?:\[([\w,-]+)\])?", arg)
            if local:
                assert (ROOT / local.group(1) / "pyproject.toml").is_file(), f"{where}: {arg}: no pyproject.toml there"
                for extra in (local.group(2) or "").split(","):
                    assert not extra or extra in _extras(), f"{where}: {arg}: no extra {extra!r} in pyproject.toml"
        return
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2] == "gradclip":
        sub = [w for w in words[3:] if not w.startswith("-")][:1]
        help_text = _help_text("gradclip", *sub)
        for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{where}: python -m gradclip {' '.join(sub)} has no {flag} option:\n{help_text}")
        return
    if words[:3] == ["python", "-m", "pytest"]:
        pytest_args = [w for w in words[3:] if not w.startswith("-")]
        for path in pytest_args:
            assert (ROOT / path).exists(), f"{where}: pytest path {path} does not exist"
        return
    if words[0] == "bash" and len(words) > 1:
        assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        return
    if words[0] == "python" and len(words) > 1 and words[1].startswith(("examples/", "bench/")):
        # A script of the repository: it exists, and it starts (without arguments it explains
        # itself and exits, or runs with its defaults: compiled here, not run).
        script = ROOT / words[1]
        assert script.is_file(), f"{where}: {words[1]} does not exist"
        compile(script.read_text(), str(script), "exec")
        return
    raise AssertionError(f"{where}: no check for the command {words!r}; add one to tests/test_readme.py")


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[b.id for b in BASH_BLOCKS])
def test_bash_block_commands_exist(block):
    commands = _commands(block.code)
    assert commands, f"{block.id}: no commands found"
    for words in commands:
        _check_command(words, f"README.md:{block.line} ({block.id})")
