"""Every Python and shell block of README.md runs as written, offline, and prints what its comments say.

The blocks run in one scratch directory with the environment a newcomer would set to try them offline,
``IMAGEROUTER_SANDBOX=1`` (every hosted API's loopback sandbox, fake keys), beside the files the snippets name
(``photo.png``, ``mask.png``, ``depth.png``, ``loras/watercolor.safetensors``). The snippets themselves are not
edited. Conventions the README follows:

- ``print(...)  # -> TEXT``: the line prints TEXT (a trailing ``...`` matches any rest);
- a ``console`` block is a transcript: ``$ COMMAND`` and its output, where a line ``...`` stands for lines left
  out and ``[...]`` or ``...`` inside a line for text left out;
- ``<!-- readme-test: skip: WHY -->`` before a block: not run, and why (few: each is listed below);
  ``<!-- readme-test: unconfigured: WHY -->``: run with nothing configured (no sandbox, no catalog);
  ``<!-- readme-test: local models: WHY -->``: run with ``IMAGEROUTER_MODELS`` naming a catalog of the local
  models it uses (here a tiny random-weight SDXL called ``sdxl``, with canny and depth ControlNets);
- YAML blocks are a model catalog (``models:``) or a policy file (``# policy.yaml``), and must load as one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell", "console": "console"}
NOT_RUN = {  # why each block that is not run is not (kept short; the README says it before each block)
    "creates a virtual environment and installs from the package index; .ci/run runs both",
    "installs from the package index",
    "needs the server running on port 8000; examples/server_client.py does the same offline and is run by "
    "the tests",
    "needs a Redis server; tests/test_jobs.py runs the queue against one it starts",
}
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(skip|unconfigured|local models):\s*(.+?)\s*-->$")
_SETTINGS = ("OPENAI_", "STABILITY_", "REPLICATE_", "TOGETHER_", "BFL_", "GEMINI_", "GOOGLE_", "XAI_", "FAL_",
             "IDEOGRAM_", "IMAGEROUTER_")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # the fence's line in README.md
    directive: str | None = None  # "skip", "unconfigured" or "local models"
    why: str | None = None

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        start, lang = i, fence[1]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _DIRECTIVE.match(before)
        out.append(Block(lang, "\n".join(lines[start + 1 : end]) + "\n", start + 1,
                         marker[1] if marker else None, marker[2] if marker else None))
        i = end + 1
    return out


BLOCKS = readme_blocks()
TO_RUN = [b for b in BLOCKS if b.lang in RUNNABLE and b.directive != "skip"]


# --- the scratch directory and the environment -------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    root: Path  # where the blocks run: the files they name
    models: Path  # the tiny models, their catalog, and a bin/ with `pixroute`


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Scratch:
    """The files the snippets name, and a catalog of tiny local models under the names the snippets use."""
    from PIL import Image, ImageDraw

    from providers.local.tiny import build_controlnet, build_lora, build_sdxl

    root = tmp_path_factory.mktemp("readme")
    models = tmp_path_factory.mktemp("readme-models")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        sdxl = build_sdxl(models / "tiny-sdxl")
        canny = build_controlnet(models / "controlnet-canny", "sdxl")
        depth = build_controlnet(models / "controlnet-depth", "sdxl", seed=2)
        build_lora(sdxl, root / "loras" / "watercolor.safetensors")
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    photo = Image.new("RGB", (64, 64), (25, 25, 25))
    ImageDraw.Draw(photo).rectangle([16, 16, 48, 32], fill=(230, 230, 230))
    photo.save(root / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([32, 0, 64, 64], fill=255)
    mask.save(root / "mask.png")
    Image.new("L", (64, 64), 128).save(root / "depth.png")
    catalog = {"models": {"sdxl": {"path": str(sdxl), "family": "sdxl", "native": [64, 64], "min_side": 64,
                                   "steps": 2, "controlnets": {"canny": str(canny), "depth": str(depth)}}}}
    (models / "models.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
    bin_dir = models / "bin"  # `pixroute` as installed, or run from this checkout
    bin_dir.mkdir()
    installed = Path(sys.executable).with_name("pixroute")
    shim = bin_dir / "pixroute"
    if installed.exists():
        shim.symlink_to(installed)
    else:
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m router.cli "$@"\n', encoding="utf-8")
        shim.chmod(0o755)
    return Scratch(root, models)


def block_env(scratch: Scratch, block: Block) -> dict[str, str]:
    models = scratch.models
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS)}
    env |= {
        "PATH": os.pathsep.join([str(models / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": str(ROOT),
        "XDG_DATA_HOME": str(scratch.root / "xdg"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DIFFUSERS_VERBOSITY": "error",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONWARNINGS": "ignore",
    }
    if block.directive != "unconfigured":
        env["IMAGEROUTER_SANDBOX"] = "1"
    if block.directive == "local models":
        env["IMAGEROUTER_MODELS"] = str(models / "models.yaml")
    return env


def run(args: list[str], scratch: Scratch, block: Block) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True, cwd=scratch.root, env=block_env(scratch, block),
                         timeout=300, check=False)
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    return out


# --- Python: run as written; each `# ->` comment is what its line printed ---------------------------------

_RUNNER = """
import builtins, json, sys
path, records = sys.argv[1], []
real = builtins.print

def print(*args, sep=" ", end="\\n", file=None, flush=False):
    caller = sys._getframe(1)
    if file in (None, sys.stdout) and caller.f_code.co_filename == path:
        records.append([caller.f_lineno, (sep or " ").join(map(str, args))])
    real(*args, sep=sep, end=end, file=file, flush=flush)

code = compile(open(path, encoding="utf-8").read(), path, "exec")
try:
    exec(code, {"__name__": "__main__", "__file__": path, "print": print})
finally:
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(records, fh)
"""


def expected_prints(code: str) -> dict[int, str]:
    """Line → what the README says that line prints (``# -> TEXT``)."""
    return {n: m[1].strip() for n, line in enumerate(code.splitlines(), 1)
            if (m := re.search(r"#\s*->\s*(.+)$", line))}


def matches(expected: str, printed: str) -> bool:
    if expected.endswith("..."):
        return printed.startswith(expected[:-3])
    return printed == expected


def run_python(block: Block, scratch: Scratch) -> None:
    snippet = scratch.root / f"readme_{block.line}.py"
    snippet.write_text(block.code, encoding="utf-8")
    records = scratch.root / f"readme_{block.line}.json"
    out = run([sys.executable, "-c", _RUNNER, str(snippet), str(records)], scratch, block)
    assert out.returncode == 0, f"README.md line {block.line}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    printed: dict[int, list[str]] = {}
    for line, text in json.loads(records.read_text(encoding="utf-8")):
        printed.setdefault(line, []).append(text)
    for line, want in expected_prints(block.code).items():
        got = printed.get(line)
        assert got, f"README.md line {block.line + line}: nothing was printed there (it says {want!r})"
        assert all(matches(want, text) for text in got), \
            f"README.md line {block.line + line} says it prints {want!r}, but it printed {got!r}"


# --- shell: run as written with bash -e; transcripts: the output shown is the output ----------------------


def run_shell(block: Block, scratch: Scratch) -> None:
    out = run(["bash", "-euo", "pipefail", "-c", block.code], scratch, block)
    assert out.returncode == 0, f"README.md line {block.line}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def transcript(code: str) -> list[tuple[str, list[str]]]:
    """``$ COMMAND`` lines (continued with ``\\``) and the output shown after each."""
    steps: list[tuple[str, list[str]]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            steps[-1][1].append(lines[i])
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + lines[i]
        steps.append((command, []))
        i += 1
    return steps


def shown_matches(shown: list[str], actual: list[str]) -> str | None:
    """None when ``actual`` is what ``shown`` shows (a ``...`` line skips lines), else what differs."""
    pos, skipping = 0, False
    for want in shown:
        if want.strip() == "...":
            skipping = True
            continue
        pattern = re.compile(re.escape(want.rstrip()).replace(r"\[\.\.\.\]", ".*").replace(r"\.\.\.", ".*"))
        while pos < len(actual) and not pattern.fullmatch(actual[pos].rstrip()):
            if not skipping:
                return f"expected {want!r}, got {actual[pos]!r}"
            pos += 1
        if pos == len(actual):
            return f"expected {want!r}: not in the output"
        pos, skipping = pos + 1, False
    return None


def run_console(block: Block, scratch: Scratch) -> None:
    for command, shown in transcript(block.code):
        out = run(["bash", "-euo", "pipefail", "-c", command], scratch, block)
        assert out.returncode == 0, f"README.md line {block.line}: {command}\n{out.stderr[-4000:]}"
        problem = shown_matches(shown, out.stdout.splitlines())
        assert problem is None, f"README.md line {block.line}: {command}: {problem}\n{out.stdout}"


@pytest.mark.parametrize("block", TO_RUN, ids=[b.id for b in TO_RUN])
def test_readme_block_runs_as_written(block: Block, workdir: Scratch) -> None:
    kind = RUNNABLE[block.lang]
    if kind == "python":
        run_python(block, workdir)
    elif kind == "console":
        run_console(block, workdir)
    else:
        run_shell(block, workdir)


# --- what is not run, and the YAML ----------------------------------------------------------------------


def test_the_readme_has_blocks_to_run_and_each_not_run_says_why() -> None:
    langs = {b.lang for b in TO_RUN}
    assert {"python", "bash", "console"} <= langs and len(TO_RUN) >= 8
    skipped = [b for b in BLOCKS if b.directive == "skip"]
    assert {b.why for b in skipped} == NOT_RUN, [(b.line, b.why) for b in skipped]
    assert all(b.lang in RUNNABLE for b in skipped)  # a marker on a block nobody would run is noise
    unknown = sorted({b.lang for b in BLOCKS} - set(RUNNABLE) - {"yaml", "text", ""})
    assert unknown == []


def test_the_readme_yaml_blocks_load_as_what_they_say() -> None:
    from policies.policy import policy_from_dict
    from providers.local.catalog import Catalog

    yamls = [b for b in BLOCKS if b.lang == "yaml"]
    kinds = []
    for block in yamls:
        data = yaml.safe_load(block.code)
        if "models" in data:
            kinds.append("catalog")
            assert len(Catalog.from_dict(data)) >= 1
        elif "detectors" in data:
            kinds.append("detectors")
            detectors = Catalog.from_dict({"models": {}, **data}).detectors
            assert len(detectors) == len(data["detectors"]) and all(kind in detectors for kind in data["detectors"])
        else:
            assert block.code.startswith("# policy.yaml")
            kinds.append("policy")
            assert policy_from_dict(data, source="policy.yaml").name == "policy"
    assert sorted(kinds) == ["catalog", "detectors", "policy"]


def test_a_transcript_with_a_wrong_line_is_caught() -> None:
    shown = ["a", "...", "c [...] e"]
    assert shown_matches(shown, ["a", "b", "c d e"]) is None
    assert shown_matches(shown, ["x", "c d e"]) == "expected 'a', got 'x'"
    assert shown_matches(["a", "b"], ["a", "c"]) == "expected 'b', got 'c'"

