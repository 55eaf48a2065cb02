"""infra/: the deployment files agree with the code they deploy (fast, no network, no cluster, no docker).

Every YAML parses; the RayJobs have the KubeRay fields they need with sane types and carry the RayCluster's spec
(image, secrets, resources, auth); the cluster launcher config passes the checks `ray up` runs before it touches AWS;
the Dockerfile installs through constraints.txt and copies what the entry points need; and every command line in
the YAMLs and in infra/README.md's ```bash blocks uses real options of the click command it runs (spg_dist's
`spg ...` / `python jobs/*.py`, Ray's `ray ...`) and names files that exist.

The checker is reusable: ``check_command_line(line)`` and ``check_markdown(path)`` return lists of problems, so any
other document's commands (README.md's) can be held to the same rule.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
# Relative paths that start with one of these name files of the repository (or of a job's working dir, which is a
# copy of it), so they must exist; any other relative path (demo_out/..., $HOME/...) is the user's.
REPO_PREFIXES = ("configs/", "jobs/", "infra/", "schemas/", "spg_dist/", "tests/", "bench/")
SHELL_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
SPG_PROGS = {"spg"}
PYTHON_RE = re.compile(r"^python(3(\.\d+)?)?$")
HELP_OPTS = {"-h", "--help"}


# --------------------------------------------------------------------------------------------------- the checker

def split_commands(text: str) -> list[list[str]]:
    """Shell text -> simple commands as argv lists: continuation lines joined, comments dropped, split at newlines
    and at ; && || | & ( ), leading VAR=value assignments removed. Good enough for documentation snippets."""
    text = text.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # unbalanced quotes: let the caller see it as a problem
            out.append(["<unparsable>", line])
            continue
        argv: list[str] = []
        for tok in tokens + [";"]:
            if tok in SHELL_SEPARATORS:
                while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                    argv.pop(0)
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(tok)
    return out


def _spg_cli():
    import spg_dist.cli

    return spg_dist.cli


@functools.cache
def _ray_cli() -> click.Group:
    from ray.scripts.scripts import cli

    return cli


def _options(cmd: click.Command) -> dict[str, click.Option]:
    opts: dict[str, click.Option] = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for o in p.opts + p.secondary_opts:
                opts[o] = p
    return opts


def _takes_value(opt: click.Option) -> bool:
    return not (opt.is_flag or opt.count)


def check_click_args(cmd: click.Command, args: list[str], name: str) -> list[str]:
    """Problems with ``args`` given to click command ``cmd`` (a group descends into its subcommand): options it
    does not have, subcommands a group does not have. Option values are skipped, never judged."""
    problems: list[str] = []
    opts = _options(cmd)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            break
        if a.startswith("-") and len(a) > 1 and not re.fullmatch(r"-\d+(\.\d+)?", a):
            key, eq, _ = a.partition("=")
            opt = opts.get(key)
            joined = False
            if opt is None and not a.startswith("--") and a[:2] in opts:  # -C2048: short option with its value
                opt, joined = opts[a[:2]], True
            if opt is None:
                if key not in HELP_OPTS:
                    problems.append(f"`{name}` has no option {key}")
                i += 1
                continue
            if _takes_value(opt) and not eq and not joined:
                i += opt.nargs if opt.nargs > 0 else 1
            i += 1
            continue
        if isinstance(cmd, click.Group):
            if a in cmd.commands:
                return problems + check_click_args(cmd.commands[a], args[i + 1:], f"{name} {a}")
            problems.append(f"`{name}` has no subcommand {a!r}")
            return problems
        i += 1  # a positional argument
    if isinstance(cmd, click.Group) and not cmd.invoke_without_command and not set(args) & HELP_OPTS:
        problems.append(f"`{name}` needs a subcommand")
    return problems


@functools.cache
def job_command(script: str) -> click.Command | None:
    """The click command a ``jobs/*.py`` entry point runs: the ``*_cmd`` it imports from ``spg_dist.cli``."""
    path = ROOT / script
    if not path.is_file():
        return None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "spg_dist.cli":
            for alias in node.names:
                if alias.name.endswith("_cmd"):
                    return getattr(_spg_cli(), alias.name)
    return None


def _repo_path(token: str) -> str | None:
    """The repository-relative path a token names (also inside --opt=PATH or KEY=PATH), else None."""
    value = token.split("=", 1)[-1] if token.startswith("-") or "=" in token else token
    value = value.split("=", 1)[-1]
    value = value.removeprefix("./")
    return value if value.startswith(REPO_PREFIXES) else None


def _exists(path: str) -> bool:
    return any(ROOT.glob(path)) if any(c in path for c in "*?[") else (ROOT / path).exists()


def _check_paths(argv: list[str]) -> list[str]:
    return [f"{p} does not exist" for tok in argv if (p := _repo_path(tok)) and not _exists(p)]


def _file_arg(path: str) -> list[str]:
    """A file a docker/kubectl/ray command names: relative ones must exist in the repository."""
    if path in ("-", ".") or "://" in path or path.startswith(("/", "~", "$")):
        return []
    return [] if _exists(path) else [f"{path} does not exist"]


@functools.cache
def infra_names() -> dict[str, set[str]]:
    """metadata.name of every Kubernetes object under infra/, by kind."""
    names: dict[str, set[str]] = {}
    for _, doc in yaml_docs():
        if isinstance(doc, dict) and "kind" in doc and "metadata" in doc:
            names.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    return names


def _check_kubectl(args: list[str]) -> list[str]:
    problems: list[str] = []
    short_f = bool(args) and args[0] not in ("logs", "attach")  # there -f is --follow, elsewhere --filename
    for i, a in enumerate(args):
        if (a == "--filename" or a == "-f" and short_f) and i + 1 < len(args):
            problems += _file_arg(args[i + 1])
        elif a.startswith("--filename="):
            problems += _file_arg(a.split("=", 1)[1])
        elif a.startswith("--from-file="):
            problems += _file_arg(a.split("=")[-1])
        # KubeRay names the head service of a RayCluster or RayJob <name>-head-svc, a RayJob's submitter Job <name>
        svc, job = re.fullmatch(r"svc/(.+)-head-svc", a), re.fullmatch(r"job/(.+)", a)
        owners = infra_names().get("RayCluster", set()) | infra_names().get("RayJob", set())
        if svc and svc.group(1) not in owners:
            problems.append(f"{a}: no RayCluster or RayJob {svc.group(1)!r} under infra/")
        if job and job.group(1) not in infra_names().get("RayJob", set()):
            problems.append(f"{a}: no RayJob {job.group(1)!r} under infra/")
    if len(args) >= 3 and args[0] in ("get", "describe", "delete") and args[1] in ("rayjob", "rayjobs") \
            and not args[2].startswith("-") and args[2] not in infra_names().get("RayJob", set()):
        problems.append(f"no RayJob {args[2]!r} under infra/")
    return problems


def _check_docker(args: list[str]) -> list[str]:
    problems: list[str] = []
    if args[:1] == ["build"] or args[:2] == ["buildx", "build"]:
        rest = args[1:] if args[0] == "build" else args[2:]
        i = 0
        positional = []
        while i < len(rest):
            a = rest[i]
            if a in ("-f", "--file"):
                problems += _file_arg(rest[i + 1]) if i + 1 < len(rest) else ["-f without a file"]
                i += 2
                continue
            if a.startswith("--file="):
                problems += _file_arg(a.split("=", 1)[1])
            elif a in ("-t", "--tag", "--build-arg", "--target", "--platform", "--secret", "--cache-from"):
                i += 1
            elif not a.startswith("-"):
                positional.append(a)
            i += 1
        problems += [p for c in positional for p in _file_arg(c)]
        if not positional:
            problems.append("docker build without a context")
    return problems


def check_argv(argv: list[str]) -> list[str]:
    """Problems of one simple command (see :func:`check_command_line`)."""
    if not argv or argv[0] in ("export", "echo", "cd", "#"):
        return []
    if argv[0] == "<unparsable>":
        return [f"cannot parse: {argv[1]}"]
    prog = Path(argv[0]).name
    args = argv[1:]
    problems = _check_paths(argv)
    if PYTHON_RE.match(prog):
        while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
            args = args[1:]  # interpreter flags (-u, -X ...)
        if args and args[0].endswith(".py"):
            script = args[0].removeprefix("./")
            if script.startswith("jobs/"):
                cmd = job_command(script)
                if cmd is None:
                    return problems + ([] if not (ROOT / script).exists()
                                       else [f"{script} imports no *_cmd from spg_dist.cli"])
                return problems + check_click_args(cmd, args[1:], script)
        return problems
    if prog in SPG_PROGS:
        return problems + check_click_args(_spg_cli().main, args, "spg")
    if prog == "ray":
        if args[:2] == ["job", "submit"]:
            if "--" not in args:
                return [*problems, "`ray job submit` without `--` before the entrypoint (ray would parse its options)"]
            cut = args.index("--")
            problems += check_click_args(_ray_cli(), args[:cut], "ray")
            return problems + check_argv(args[cut + 1:])
        problems += check_click_args(_ray_cli(), args, "ray")
        if args and args[0] in ("up", "down", "attach", "exec", "dashboard", "get-head-ip", "submit", "rsync-up",
                                "rsync-down", "get-worker-ips", "monitor"):
            config = [a for a in args[1:] if not a.startswith("-")][:1]
            problems += _file_arg(config[0]) if config else [f"ray {args[0]}: no cluster config"]
        return problems
    if prog == "kubectl":
        return problems + _check_kubectl(args)
    if prog == "docker":
        return problems + _check_docker(args)
    return problems


def check_command_line(line: str) -> list[str]:
    """Problems of a shell command line (continuations, ;, &&, | and env prefixes allowed): `spg ...` and
    `python jobs/*.py ...` must use options of the click command they run, `ray ...` (and the entrypoint after a
    `ray job submit ... --`) options of Ray's CLI, docker/kubectl/ray up must name files that exist, and every
    configs/, jobs/, infra/ ... path must exist. An empty list means no problem."""
    return list(dict.fromkeys(p for argv in split_commands(line) for p in check_argv(argv)))


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def check_markdown(path: Path) -> list[str]:
    """Problems of every command in a Markdown file's ```bash blocks, each prefixed with the file name."""
    return [f"{path.name}: {p}" for block in bash_blocks(path.read_text()) for p in check_command_line(block)]


# ------------------------------------------------------------------------------------------------------ the files

def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def yaml_docs() -> Iterator[tuple[Path, Any]]:
    for p in yaml_files():
        for doc in yaml.safe_load_all(p.read_text()):
            if doc is not None:
                yield p, doc


def docs_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in yaml_docs() if isinstance(d, dict) and d.get("kind") == kind]


RAYJOBS = docs_of_kind("RayJob")
RAYCLUSTERS = docs_of_kind("RayCluster")
LAUNCHER = INFRA / "cluster-aws.yaml"


def pinned(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE).group(1)


def container(pod_template: dict, index: int = 0) -> dict:
    return pod_template["spec"]["containers"][index]


def groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    return [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]


def images() -> set[str]:
    found = set()
    for _, doc in yaml_docs():
        for m in re.finditer(r"\bimage: *([^\s#]+)", yaml.safe_dump(doc)):
            found.add(m.group(1))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def command_strings() -> Iterator[tuple[str, str]]:
    """Every shell command under infra/*.yaml: RayJob entrypoints and the cluster launcher's command lists."""
    for p, job in RAYJOBS:
        yield f"{p.name}: spec.entrypoint", job["spec"]["entrypoint"]
    cfg = yaml.safe_load(LAUNCHER.read_text())
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key) or []:
            yield f"{LAUNCHER.name}: {key}", cmd


# -------------------------------------------------------------------------------------------------------- tests

def test_every_yaml_under_infra_parses():
    files = yaml_files()
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob-sweep.yaml", "rayjob-reproduce.yaml",
                                       "cluster-aws.yaml"}
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs, f"{p.name} is empty"
        for d in docs:
            assert isinstance(d, dict), p.name
            if "kind" in d:  # a Kubernetes object
                assert isinstance(d.get("apiVersion"), str) and d["metadata"]["name"], p.name
                assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), p.name


@pytest.mark.parametrize("path,job", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_rayjob_fields(path, job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert len(job["metadata"]["name"]) <= 47, "KubeRay derives cluster and Job names from it"
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("python jobs/")
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert type(spec[key]) is int and spec[key] > 0, key
    assert type(spec["backoffLimit"]) is int and spec["backoffLimit"] >= 0
    assert isinstance(spec["runtimeEnvYAML"], str)
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = [rest for word, rest in dockerfile_instructions() if word == "WORKDIR"][-1]
    assert renv["working_dir"] == workdir, "the runtime env's working_dir is the project dir baked into the image"
    # a local working_dir is uploaded by a submitter running the head's image (a Job or the head's sidecar); in
    # HTTPMode the operator would pass the bare path on, which Ray refuses
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode")
    env = renv["env_vars"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), "Ray wants string env values"
    assert env["RAY_AUTH_MODE"] == "token" and env["HF_HUB_OFFLINE"] == "1"
    secretish = [k for k in env if k.startswith("AWS_") or "TOKEN" in k or "SECRET" in k or "PASSWORD" in k]
    assert not secretish, f"credentials belong in the pods' Secrets, not the runtime env: {secretish}"
    assert isinstance(spec["rayClusterSpec"], dict)


@pytest.mark.parametrize("path,doc", RAYJOBS + RAYCLUSTERS, ids=[p.name for p, _ in RAYJOBS + RAYCLUSTERS])
def test_ray_cluster_spec(path, doc):
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == pinned("ray"), "rayVersion is the Ray the image installs"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs drivers and commits only"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert all(isinstance(v, str) for _, g in groups(spec) for v in g["rayStartParams"].values()), \
        "rayStartParams values are strings"
    assert "nvidia.com/gpu" not in container(head["template"])["resources"]["limits"]
    (gpu,) = [g for g in spec["workerGroupSpecs"]
              if "nvidia.com/gpu" in container(g["template"])["resources"]["limits"]]
    res = container(gpu["template"])["resources"]
    for part in ("limits", "requests"):
        assert res[part]["nvidia.com/gpu"] == 1 and str(res[part]["cpu"]) == "16", part
    assert 1 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    for _, g in groups(spec):
        c = container(g["template"])
        assert c["image"].endswith(f"/spg-dist:{project_version()}"), "the image is tagged with the version"
        assert {"secretRef": {"name": "store-credentials"}} in c["envFrom"], "head and workers reach the store"
        assert not any(e.get("name", "").startswith("AWS_") and "value" in e for e in c.get("env", [])), \
            "no literal credentials in a manifest"
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, "Ray's object store needs a real /dev/shm"
        volumes = {v["name"]: v for v in g["template"]["spec"].get("volumes", [])}
        assert all(m["name"] in volumes for m in mounts.values())


def _comparable(spec: dict) -> dict:
    """What a RayJob's cluster must share with infra/raycluster.yaml: everything but the inputs volume."""
    spec = copy.deepcopy(spec)
    for _, g in groups(spec):
        pod = g["template"]["spec"]
        inputs = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        pod["volumes"] = [v for v in pod.get("volumes", []) if v["name"] not in inputs]
        for c in pod["containers"]:
            c["volumeMounts"] = [m for m in c.get("volumeMounts", []) if m["name"] not in inputs]
    return spec


@pytest.mark.parametrize("path,job", RAYJOBS, ids=[p.name for p, _ in RAYJOBS])
def test_rayjob_cluster_matches_raycluster(path, job):
    (_, cluster), = RAYCLUSTERS
    assert _comparable(job["spec"]["rayClusterSpec"]) == _comparable(cluster["spec"]), \
        "image, secrets, resources, auth, start params of a RayJob's cluster = infra/raycluster.yaml's"
    # an inputs volume, when a RayJob has one, is the RayCluster's (same claim, same read-only mounts)
    for (_, g), (_, cg) in zip(groups(job["spec"]["rayClusterSpec"]), groups(cluster["spec"])):
        pvcs = [v for v in g["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
        assert all(v in cg["template"]["spec"]["volumes"] for v in pvcs)


@pytest.mark.parametrize("path,doc", RAYJOBS + RAYCLUSTERS, ids=[p.name for p, _ in RAYJOBS + RAYCLUSTERS])
def test_inputs_are_mounted_read_only_where_the_command_reads_them(path, doc):
    """Every absolute path of the entrypoint lies under a read-only mount of a shared claim on the head (where the
    driver checks it) and on every worker (where tasks read it)."""
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    if doc["kind"] == "RayCluster":  # a long-lived cluster: the paths infra/README.md's jobs read
        paths = ["/data/x", "/models/x"]
    else:
        paths = re.findall(r"(?<![\w:/])(/[\w.\-/]+)", doc["spec"]["entrypoint"])
    claims = {c["metadata"]["name"] for _, c in docs_of_kind("PersistentVolumeClaim")}
    for name, g in groups(spec):
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for p in paths:
            hits = [m for m in container(g["template"]).get("volumeMounts", [])
                    if p == m["mountPath"] or p.startswith(m["mountPath"].rstrip("/") + "/")]
            assert hits, f"{name}: nothing mounted at {p}"
            m = hits[0]
            v = volumes[m["name"]]
            assert m.get("readOnly") is True and v["persistentVolumeClaim"]["readOnly"] is True, (name, p)
            assert v["persistentVolumeClaim"]["claimName"] in claims, "the claim is defined under infra/"


def test_one_image_and_one_store_everywhere():
    assert len(images()) == 1, images()
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["image"] in images()
    stores = set(re.findall(r"--store (\S+)", " ".join(cmd for _, cmd in command_strings())))
    assert len(stores) == 1 and next(iter(stores)).startswith("s3://"), stores


@pytest.mark.parametrize("where,line", list(command_strings()), ids=[w for w, _ in command_strings()])
def test_yaml_command_lines_are_real(where, line):
    assert check_command_line(line) == [], where


def test_entrypoints_run_job_scripts_with_their_options():
    for p, job in RAYJOBS:
        (argv,) = split_commands(job["spec"]["entrypoint"])
        assert argv[0] == "python" and (ROOT / argv[1]).is_file() and job_command(argv[1]) is not None, p.name
        assert check_argv(argv) == [], p.name


def test_ray_start_params_are_ray_start_options():
    for p, doc in RAYJOBS + RAYCLUSTERS:
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for name, g in groups(spec):
            argv = ["ray", "start"] + [f"--{k}={v}" for k, v in g["rayStartParams"].items()]
            assert check_argv(argv) == [], f"{p.name} {name}"


def test_cluster_launcher_config_passes_ray_up_checks():
    """The checks `ray up` runs before it contacts AWS: defaults filled in, then Ray's own JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "docker",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in raw, key
    # set explicitly: the AWS defaults would otherwise install Ray and an unconstrained boto3 over the image's
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert key in raw, key
    assert raw["setup_commands"] == [] and raw["worker_setup_commands"] == []
    validate_config(prepare_config(copy.deepcopy(raw)))
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m6i.2xlarge" and head["resources"].get("CPU") == 0
    workers = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert workers and all(re.match(r"(g5|g6e?|p4de?|p5e?n?)\.", t["node_config"]["InstanceType"]) for t in workers)
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"] for t in workers)
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=0.0.0.0" in head_start and "--num-cpus=0" in head_start
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # `ray start` in token mode needs the token on every node; the image does not carry it
    assert "~/.ray/auth_token" in raw["file_mounts"]


def test_dockerfile_installs_through_constraints_and_copies_what_jobs_need():
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms[-1].startswith("nvidia/cuda:"), "a CUDA-capable base"
    assert [rest for word, rest in ins if word == "WORKDIR"][-1] == "/app"
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "pip install -c constraints.txt -e ." in runs, "README's install command, through constraints.txt"
    pips = [argv for argv in split_commands(runs) if Path(argv[0]).name == "pip" and argv[1:2] == ["install"]]
    assert pips and all(argv[2:4] == ["-c", "constraints.txt"] for argv in pips), "every pip install is constrained"
    copied: set[str] = set()
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: no such path"
                copied.add(s.rstrip("/"))
    assert copied >= {"pyproject.toml", "constraints.txt", "README.md", "spg_dist", "schemas", "jobs", "configs"}
    # what the entrypoints name (their scripts and configs) is inside the image's working dir
    for _, line in command_strings():
        for argv in split_commands(line):
            for tok in argv:
                if (p := _repo_path(tok)) and p.startswith(("jobs/", "configs/")):
                    assert p.split("/")[0] in copied, p
    ignore = INFRA / "Dockerfile.dockerignore"
    if ignore.exists():
        patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        import fnmatch

        for s in copied:
            assert not any(fnmatch.fnmatch(s, pat) for pat in patterns), f"{s} is copied but dockerignored"


def test_infra_readme_commands_are_real():
    readme = INFRA / "README.md"
    assert check_markdown(readme) == []
    lines = [" ".join(argv) for block in bash_blocks(readme.read_text()) for argv in split_commands(block)]
    for needed in ("docker build -f infra/Dockerfile", "kubectl apply -f infra/raycluster.yaml",
                   "kubectl apply -f infra/rayjob-sweep.yaml", "kubectl apply -f infra/rayjob-reproduce.yaml",
                   "ray up infra/cluster-aws.yaml", "ray down infra/cluster-aws.yaml", "ray job submit",
                   "ray get-auth-token --generate", "kubectl create secret generic ray-auth-token"):
        assert any(ln.startswith(needed) for ln in lines), f"infra/README.md shows no `{needed}`"


@pytest.mark.parametrize("line,expect", [
    ("python jobs/sweep.py --config configs/sweep-demo.yaml --store s3://b/s", []),
    ("python jobs/sweep.py --config configs/sweep-demo.yaml --bogus 1", ["has no option --bogus"]),
    ("python jobs/sweep.py --config configs/nope.yaml", ["configs/nope.yaml does not exist"]),
    ("python jobs/nope.py --x", ["jobs/nope.py does not exist"]),
    ("spg train-sae --backbone b -C 2048,4096 -k 16 --gpu --no-gpu --layer -1", []),
    ("spg train-sae --backbone b -C2048", []),
    ("spg sweep report sweep-demo --store s", []),
    ("spg sweep --config configs/sweep-demo.yaml --dry-run", []),
    ("spg swep --config x", ["no subcommand 'swep'"]),
    (".venv/bin/spg extract --dataset mvtec:/d --actorz 2", ["has no option --actorz"]),
    ("RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token ray job submit --working-dir . -- \\\n"
     + "    python jobs/extract.py --dataset mvtec:/data/x --batch-size 64", []),
    ("ray job submit --working-dir . -- python jobs/extract.py --batchsize 64", ["has no option --batchsize"]),
    ("ray job submit --working-dir . python jobs/extract.py", ["without `--`"]),
    ("ray job submit --workdir . -- python jobs/extract.py", ["has no option --workdir"]),
    ("ray up infra/nope.yaml --yes", ["infra/nope.yaml does not exist"]),
    ("ulimit -n 65536; RAY_AUTH_MODE=token ray start --head --dashboard-host=0.0.0.0", []),
    ("ray start --head --num-cpu=0", ["has no option --num-cpu"]),
    ("docker build -f infra/Dockerfile -t r/spg-dist:0.2.0 .", []),
    ("docker build -f infra/Dockerfil .", ["infra/Dockerfil does not exist"]),
    ("kubectl apply -f infra/raycluster.yaml && kubectl get pods", []),
    ("kubectl apply -f infra/missing.yaml", ["infra/missing.yaml does not exist"]),
    ("kubectl port-forward svc/spg-dist-head-svc 8265:8265 &", []),
    ("kubectl port-forward svc/other-head-svc 8265:8265", ["no RayCluster or RayJob 'other'"]),
    ("kubectl port-forward svc/spg-reproduce-head-svc 8265:8265", []),
    ("kubectl logs -f job/spg-nope", ["no RayJob 'spg-nope'"]),
    ("kubectl logs -f job/spg-sweep-demo", []),
    ("spg demo --out x  # a comment --not-an-option", []),
    ("sed -i 's#REGISTRY#r#' infra/*.yaml", []),
    ("cat infra/*.yml", ["infra/*.yml does not exist"]),
])
def test_checker(line, expect):
    problems = check_command_line(line)
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect):
        assert e in p, problems


def test_root_readme_commands_use_real_options_and_files():
    """Every `spg`, `python jobs/...`, `ray`, `kubectl` and `docker` line in README.md names real options and files."""
    assert check_markdown(ROOT / "README.md") == []
