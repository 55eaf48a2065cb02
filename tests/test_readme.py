"""README.md, executed: every fenced code block runs as written, in order, in a temporary copy of the repository.

* ```` ```bash ```` / ``sh`` / ``console`` blocks run line by line in bash (``set -e``), each block in the
  environment the blocks before it left (so ``source .venv/bin/activate`` holds for every later block, as in one
  terminal); ```` ```python ```` blocks run in one shared namespace (a later snippet sees an earlier one's names).
* Lines that need a cloud, Kubernetes or a cluster (``docker``, ``kubectl``, ``helm``, ``aws``, ``gcloud``, any
  ``ray`` CLI command) are not run: they are checked with ``tests/test_infra.py``'s checker (real options, files
  that exist). So are the install lines (``python3 -m venv``, ``pip install``: the constraints file and the extras
  they name must exist) and the test command itself (``python -m pytest``).
* ``<!-- readme-test: skip REASON -->`` before a block: its lines are checked the same way, not run.
* ``<!-- readme-test: expect-output -->`` before a block: the next fenced block is what it prints (stdout). Lines
  must match after trailing spaces are stripped; a line ``...`` stands for any number of lines (wall times, paths).

A failure names the README line: ``README.md:LINE: what went wrong``. The runner is this file run as a script
(``python tests/test_readme.py README.md WORKDIR [--check-only]``), so the README's snippets never run inside the
test process; the unit tests below feed it broken READMEs to prove it fails where it should.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(.*?)\s*-->")
EXPECT = re.compile(r"<!--\s*readme-test:\s*expect-output\s*-->")
SHELL = {"bash", "sh", "shell", "console"}
CLOUD = {"docker", "kubectl", "helm", "aws", "gcloud", "gsutil", "az", "ray"}  # checked, never run
MAX_SKIPS = 6  # skips stay a handful: each must say why it cannot run in CI
# one block (the demo is the longest: ~4 min on 2 idle cores, 20+ when other jobs share them)
BLOCK_TIMEOUT_S = int(os.environ.get("README_TEST_BLOCK_TIMEOUT", "2400"))


@dataclass
class Block:
    lang: str
    start: int  # README line number of the first code line (1-based)
    lines: list[str]
    skip: str | None = None
    expect: "Block | None" = None
    is_output: bool = False

    @property
    def runnable(self) -> bool:
        return not self.is_output and (self.lang in SHELL or self.lang == "python")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- parsing

def parse_blocks(text: str) -> list[Block]:
    """Fenced blocks with their markers; the block after an expect-output block's command block is its output."""
    lines = text.splitlines()
    blocks: list[Block] = []
    skip: str | None = None
    expect = False
    waiting: Block | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := SKIP.search(line):
            skip = m.group(1) or ""
        if EXPECT.search(line):
            expect = True
        f = FENCE.match(line)
        if f:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            block = Block(f.group(1).lower(), i + 2, lines[i + 1:j])
            if waiting is not None:
                block.is_output, waiting.expect, waiting = True, block, None
            else:
                block.skip = skip
                if expect:
                    waiting = block
            skip, expect = None, False
            blocks.append(block)
            i = j + 1
            continue
        i += 1
    return blocks


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(README line, command) per shell command: continuation lines joined, comments and blanks dropped, a
    ``console`` block's ``$ `` prompts stripped (its other lines are output)."""
    out: list[tuple[int, str]] = []
    buf, first = "", 0
    for n, raw in enumerate(block.lines, start=block.start):
        line = raw
        if block.lang == "console":
            if not buf and not line.startswith("$ "):
                continue
            line = line[2:] if not buf else line
        if not buf:
            first = n
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((first, buf + line))
        buf = ""
    if buf:
        out.append((first, buf))
    return out


# ------------------------------------------------------------------------------------------------- the checker

def _infra():
    spec = importlib.util.spec_from_file_location("_readme_infra_checker", ROOT / "tests" / "test_infra.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extras() -> set[str]:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["project"].get("optional-dependencies", {}))


def kind_of(command: str) -> str:
    """``run``, or why the command is only checked: ``cloud``, ``install``, ``tests``."""
    infra = _infra_cached()
    for argv in infra.split_commands(command):
        prog = os.path.basename(argv[0])
        if prog in CLOUD:
            return "cloud"
        if prog in ("pip", "pip3") or (len(argv) > 2 and argv[1:3] in (["-m", "venv"], ["-m", "pip"])):
            return "install"
        if len(argv) > 2 and argv[1:3] == ["-m", "pytest"] or prog == "pytest":
            return "tests"
    return "run"


_INFRA = None


def _infra_cached():
    global _INFRA
    if _INFRA is None:
        _INFRA = _infra()
    return _INFRA


def check_line(command: str) -> list[str]:
    """Problems of a command that is not run: options and files (test_infra's checker), and for install lines the
    files (-c, -r) and extras they name."""
    infra = _infra_cached()
    problems = list(infra.check_command_line(command))
    for argv in infra.split_commands(command):
        if "install" not in argv:
            continue
        for i, a in enumerate(argv):
            if a in ("-c", "-r", "--constraint", "--requirement") and i + 1 < len(argv) \
                    and not (ROOT / argv[i + 1]).exists():
                problems.append(f"{argv[i + 1]} does not exist")
            if m := re.fullmatch(r"\.?\[([\w,-]+)\]", a.strip("'\"").removeprefix(".")):
                problems += [f"pyproject.toml has no extra {e!r}" for e in m.group(1).split(",") if e not in _extras()]
    return problems


# -------------------------------------------------------------------------------------------------- the runner

def match_output(expected: list[str], actual: str) -> tuple[int, str] | None:
    """None when ``expected`` (``...`` lines: any lines) occurs in ``actual``; else (index of the first expected
    line that does not match, what differs)."""
    got = [ln.rstrip() for ln in actual.splitlines()]
    segments: list[list[tuple[int, str]]] = [[]]
    for i, ln in enumerate(expected):
        if ln.strip() == "...":
            segments.append([])
        else:
            segments[-1].append((i, ln.rstrip()))
    pos = 0
    for seg in (s for s in segments if s):
        want = [t for _, t in seg]
        for k in range(pos, len(got) - len(want) + 1):
            if got[k:k + len(want)] == want:
                pos = k + len(want)
                break
        else:
            near = next((k for k in range(pos, len(got)) if got[k] == want[0]), None)
            if near is None:
                return seg[0][0], f"the output has no line {want[0]!r}"
            bad = next(j for j in range(len(want)) if near + j >= len(got) or got[near + j] != want[j])
            return seg[bad][0], (f"expected {want[bad]!r}, the command printed "
                                 f"{got[near + bad] if near + bad < len(got) else '<end of output>'!r}")
    return None


def _bash_script(block: Block, commands: list[tuple[int, str]], state: Path) -> str:
    """The block as a bash script whose line numbers are the README's (so $LINENO names the README line). It starts
    with the shell state the blocks before it left (exported variables through the environment, plain ones such
    as ``SAE=...`` from ``state.vars``) and saves its own on exit, as one terminal would keep them."""
    env_file, vars_file = shlex.quote(f"{state}.env"), shlex.quote(f"{state}.vars")
    header = (f"__before=\" $(compgen -v | tr '\\n' ' ') \"; "
              f"if [ -f {vars_file} ]; then source {vars_file}; fi; "
              f"__save() {{ env -0 > {env_file}; for __v in $(compgen -v); do case \"$__before\" in "
              f"*\" $__v \"*) continue;; esac; case \"$__v\" in __*) continue;; esac; declare -p \"$__v\"; "
              f"done > {vars_file} 2>/dev/null; }}; "
              "set -eo pipefail; trap __save EXIT; trap 'echo \"README_FAILED_AT $LINENO (exit $?)\" >&2' ERR")
    lines = [""] * (block.start - 1 + len(block.lines))
    lines[0] = header
    for first, cmd in commands:
        lines[first - 1] = cmd  # continuation lines were joined onto the command's first line
    return "\n".join(lines) + "\n"


def run_readme(readme: Path, workdir: Path, check_only: bool = False, echo=print) -> Report:
    text = readme.read_text()
    name = readme.name
    blocks = parse_blocks(text)
    report = Report()
    env = dict(os.environ)
    import types

    module = types.ModuleType("__readme__")  # a real module: dataclasses and pickling look classes up there
    sys.modules[module.__name__] = module
    namespace: dict = module.__dict__
    state = workdir / ".readme-test-state"
    skips = [b for b in blocks if b.skip is not None]
    for b in skips:
        if not b.skip.strip():
            report.problems.append(f"{name}:{b.start - 1}: a readme-test skip marker must say why")
    if len(skips) > MAX_SKIPS:
        report.problems.append(f"{name}: {len(skips)} blocks skipped, at most {MAX_SKIPS}")
    for b in blocks:
        if not b.runnable:
            continue
        if b.lang == "python":
            if b.skip is not None or check_only:
                try:
                    compile("\n" * (b.start - 1) + "\n".join(b.lines), name, "exec")
                except SyntaxError as e:
                    report.problems.append(f"{name}:{e.lineno}: SyntaxError: {e.msg}")
                (report.skipped if b.skip is not None else report.checked).append(f"{name}:{b.start} python")
                continue
            t0 = time.perf_counter()
            problem = _exec_python(b, name, namespace, workdir, env)
            echo(f"[readme] {name}:{b.start} python ({time.perf_counter() - t0:.0f} s)")
            report.ran.append(f"{name}:{b.start} python")
            if problem:
                report.problems.append(problem)
                return report
            continue
        commands = logical_lines(b)
        run: list[tuple[int, str]] = []
        for first, cmd in commands:
            kind = "skip" if b.skip is not None else kind_of(cmd)
            if kind == "run" and not check_only:
                run.append((first, cmd))
                continue
            report.problems += [f"{name}:{first}: {p}" for p in check_line(cmd)]
            (report.skipped if kind == "skip" else report.checked).append(f"{name}:{first} ({kind}) {cmd[:80]}")
        if not run:
            continue
        t0 = time.perf_counter()
        script = _bash_script(b, run, state)
        proc = _run_bash(script, workdir, env)
        if proc is None:
            report.problems.append(f"{name}:{run[0][0]}: the block did not finish within {BLOCK_TIMEOUT_S} s "
                                   f"(README_TEST_BLOCK_TIMEOUT)")
            return report
        echo(f"[readme] {name}:{b.start} bash, {len(run)} commands ({time.perf_counter() - t0:.0f} s)")
        report.ran += [f"{name}:{first} {cmd[:80]}" for first, cmd in run]
        env_file = Path(f"{state}.env")
        if env_file.exists():
            env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv)
            env_file.unlink()
        if proc.returncode != 0:
            m = re.search(r"README_FAILED_AT (\d+)", proc.stderr)
            line = int(m.group(1)) if m else b.start
            line = max((f for f, _ in run if f <= line), default=line)
            tail = [ln for ln in (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines())
                    if "README_FAILED_AT" not in ln][-3:]
            report.problems.append(f"{name}:{line}: exit {proc.returncode}: `{dict(run).get(line, '')[:100]}`"
                                   + (": " + " | ".join(tail) if tail else ""))
            return report
        if b.expect is not None:
            if (bad := match_output(b.expect.lines, proc.stdout)) is not None:
                report.problems.append(f"{name}:{b.expect.start + bad[0]}: the output differs from what {name} "
                                       f"shows: {bad[1]}")
                return report
    return report


def _run_bash(script: str, workdir: Path, env: dict) -> subprocess.CompletedProcess | None:
    """Run a block's script in its own process group; None (and the whole group stopped) when it times out."""
    import signal

    proc = subprocess.Popen(["bash", "-c", script], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _exec_python(block: Block, name: str, namespace: dict, workdir: Path, env: dict) -> str | None:
    code = "\n" * (block.start - 1) + "\n".join(block.lines)
    cwd, saved = os.getcwd(), dict(os.environ)
    try:
        os.chdir(workdir)
        os.environ.update({k: v for k, v in env.items() if k not in ("PWD", "OLDPWD", "SHLVL", "_")})
        exec(compile(code, name, "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - any failure of a snippet is a README problem
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == name]
        line = frames[-1].lineno if frames else block.start
        return f"{name}:{line}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    return None


def main(argv: list[str]) -> int:
    check_only = "--check-only" in argv
    readme, workdir = (Path(a) for a in [a for a in argv if not a.startswith("--")][:2])
    report = run_readme(readme.resolve(), workdir.resolve(), check_only=check_only,
                        echo=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps({"problems": report.problems, "ran": len(report.ran), "checked": report.checked,
                      "skipped": report.skipped}))
    return 1 if report.problems else 0


# ----------------------------------------------------------------------------------------------- the test side

# What a fresh clone does not have: outputs of earlier runs at the top level, caches anywhere.
TOP_LEVEL_OUTPUTS = {".git", ".venv", "demo_out", "reproduce_out", "store", "data", "sweep_reports", "out"}
CACHES = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".readme-test-state*")


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == ROOT
    return set(CACHES(folder, names)) | ({n for n in names if n in TOP_LEVEL_OUTPUTS
                                          or n.endswith((".png", ".csv", ".log"))} if top else set())


def working_copy(dest: Path) -> Path:
    """The repository's files (no outputs, no caches) with the project's virtual environment beside them as
    ``.venv`` (a link: the README's own install line is checked, not run)."""
    shutil.copytree(ROOT, dest, ignore=_ignore)
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "activate").exists() else Path(sys.prefix)
    if (venv / "bin" / "activate").exists():
        (dest / ".venv").symlink_to(venv)
    else:  # not a venv: a stand-in activate that puts this interpreter's scripts on PATH
        (dest / ".venv" / "bin").mkdir(parents=True)
        (dest / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    return dest


def run_runner(readme: Path, workdir: Path, *extra: str, timeout: int = 3000) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    # as a newcomer's shell: the venv is not on PATH until the README activates it
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith((str(ROOT / ".venv"), sys.prefix)))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, str(readme), str(workdir), *extra], capture_output=True,
                          text=True, env=env, timeout=timeout)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    try:
        out = json.loads(last)
    except json.JSONDecodeError:
        out = {"problems": [f"runner crashed: {proc.stderr[-2000:]}"]}
    return proc.returncode, out, proc.stderr


def test_parse_blocks_markers_and_outputs():
    text = ("intro\n<!-- readme-test: skip needs a GPU -->\n```bash\nspg x\n```\n"
            "<!-- readme-test: expect-output -->\n```bash\necho hi\n```\nprose\n```\nhi\n```\n"
            "```python\nx = 1\n```\n```\nnot run\n```\n")
    b = parse_blocks(text)
    assert [x.lang for x in b] == ["bash", "bash", "", "python", ""]
    assert b[0].skip == "needs a GPU" and b[0].start == 4
    assert b[1].expect is b[2] and b[2].is_output and b[2].lines == ["hi"]
    assert [x.runnable for x in b] == [True, True, False, True, False]
    cont = Block("bash", 10, ["a --x 1 \\", "   --y 2   # c", "# comment", "", "b"])
    assert logical_lines(cont) == [(10, "a --x 1     --y 2   # c"), (14, "b")]


def test_match_output_with_ellipsis():
    out = "noise\ntable\n  a  1.0\n  b  2.0\ntimes 3.1 s\nend\n"
    assert match_output(["table", "  a  1.0", "  b  2.0", "...", "end"], out) is None
    assert match_output(["...", "  b  2.0", "times 3.1 s"], out) is None
    index, why = match_output(["table", "  a  1.0", "  b  2.5"], out)
    assert index == 2 and "2.5" in why and "2.0" in why
    assert "no line" in match_output(["missing"], out)[1]


def test_kinds_of_lines():
    assert kind_of("spg demo --out x") == "run"
    assert kind_of("kubectl apply -f infra/raycluster.yaml") == "cloud"
    assert kind_of("RAY_ADDRESS=http://x ray job submit --working-dir . -- python jobs/extract.py") == "cloud"
    assert kind_of("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e .") == "install"
    assert kind_of(".venv/bin/python -m pytest -q") == "tests"
    assert check_line('.venv/bin/pip install -c constraints.txt -e ".[test]"') == []
    assert check_line('.venv/bin/pip install -c nope.txt -e ".[nope]"') == ["nope.txt does not exist",
                                                                             "pyproject.toml has no extra 'nope'"]


BROKEN = """# A README

```bash
echo one
false
echo never
```
"""

BROKEN_PY = """# A README

```python
x = 1
```

Text.

```python
y = x + 1
print(undefined_name)
```
"""

BROKEN_OUTPUT = """<!-- readme-test: expect-output -->
```bash
printf 'a 1\\nb 2\\n'
```

```
a 1
b 3
```
"""

BROKEN_INFRA = """```bash
kubectl apply -f infra/no-such-file.yaml
spg extract --no-such-option 1
```
"""


@pytest.mark.parametrize("text,line,needle", [
    (BROKEN, 5, "exit 1: `false`"),
    (BROKEN_PY, 11, "NameError"),
    (BROKEN_OUTPUT, 8, "expected 'b 3'"),
    (BROKEN_INFRA, 2, "infra/no-such-file.yaml does not exist"),
])
def test_runner_reports_a_broken_readme_by_line(tmp_path, text, line, needle):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_runner(readme, work, timeout=300)
    assert code == 1, (out, err)
    assert any(p.startswith(f"README.md:{line}:") and needle in p for p in out["problems"]), out["problems"]


def test_runner_passes_a_good_readme_and_keeps_state(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\nexport GREETING=hello\nPLAIN=kept\nmkdir -p sub && echo $GREETING > sub/f.txt\n```\n\n"
                      "<!-- readme-test: expect-output -->\n```bash\ncat sub/f.txt\necho \"$GREETING again, $PLAIN\"\n```\n"
                      "```\nhello\n...\nhello again, kept\n```\n"
                      "```python\nimport os\nfrom pathlib import Path\nword = Path('sub/f.txt').read_text().strip()\n"
                      "assert os.environ['GREETING'] == 'hello' and 'PLAIN' not in os.environ\n```\n"
                      "```python\nfrom dataclasses import dataclass\n@dataclass(frozen=True)\nclass P:\n    x: int = 1\n"
                      "assert word == 'hello' and P().x == 1\n```\n"
                      "<!-- readme-test: skip needs a cluster -->\n```bash\nspg extract --help\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_runner(readme, work, timeout=300)
    assert code == 0, (out, err)
    assert out["ran"] == 7 and len(out["skipped"]) == 1


def test_readme_lines_that_are_not_run_are_sound(tmp_path):
    """Fast, every CI: the README parses, its skips say why (a handful at most), and every command it does not
    run in CI (cloud, install, tests, skipped blocks) uses real options and names files that exist."""
    code, out, err = run_runner(ROOT / "README.md", tmp_path, "--check-only", timeout=300)
    assert code == 0, out["problems"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_readme_runs_as_written(tmp_path):
    """Every block of README.md, in order, in a fresh copy of the repository (the demo included)."""
    work = working_copy(tmp_path / "repo")
    t0 = time.perf_counter()
    code, out, err = run_runner(work / "README.md", work, timeout=3300)
    print(err[-6000:])
    print(f"README run: {time.perf_counter() - t0:.0f} s, {out.get('ran')} commands/snippets run, "
          f"{len(out.get('checked', []))} checked, {len(out.get('skipped', []))} skipped")
    assert code == 0, "\n".join(out["problems"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
