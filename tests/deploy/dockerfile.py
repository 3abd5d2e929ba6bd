"""Read the Dockerfile and replay its stages on this machine (there is no Docker engine here).

`parse` gives the stages and their instructions. `Replay` applies a stage the way the builder would, with
the image's `/` at a directory of ours: ENV, ARG, WORKDIR and COPY (honouring .dockerignore), and RUN
through `/bin/sh -c` where asked; what it leaves is the environment and working directory of the stage.
It covers the Dockerfile syntax this project uses and fails loudly on anything else.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = ["Dockerfile", "Instruction", "Replay", "Stage", "StageState", "expand", "parse"]

_VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::-(?P<default>[^}]*))?\}|(?P<bare>\w+))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Docker's substitution in ENV, ARG, WORKDIR and COPY: `$VAR`, `${VAR}`, `${VAR:-default}`."""
    if re.search(r"\$\{\w+:[^-]", text):
        raise ValueError(f"unsupported substitution in {text!r}")

    def value(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        if match["default"] is not None and not env.get(name):
            return match["default"]
        return env.get(name, "")

    return _VARIABLE.sub(value, text)


@dataclass(frozen=True)
class Instruction:
    """One instruction, continuation lines joined: `COPY --from=builder /a /b` is ("COPY", {"from": ...})."""

    keyword: str
    flags: dict[str, str]
    value: str

    def exec_form(self) -> list[str]:
        """The JSON array of a CMD (or of HEALTHCHECK's CMD)."""
        text = self.value.removeprefix("CMD ").strip() if self.keyword == "HEALTHCHECK" else self.value
        argv = json.loads(text)
        assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), text
        return argv


@dataclass
class Stage:
    """`FROM base AS name` and the instructions up to the next FROM."""

    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name} has {len(found)} {keyword} instructions, expected one"
        return found[0]

    def env_literals(self) -> dict[str, str]:
        """The stage's own ENV assignments as written (quotes removed, variables not expanded)."""
        return dict(word.split("=", 1) for ins in self.all("ENV") for word in shlex.split(ins.value))


@dataclass
class Dockerfile:
    """The ARGs declared before the first FROM (with defaults) and the stages by name."""

    args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built on, base first."""
        stages = [self.stages[name]]
        while stages[0].base in self.stages:
            stages.insert(0, self.stages[stages[0].base])
        return stages


def _logical_lines(text: str) -> list[str]:
    """Comment lines dropped (also inside continuations, as Docker does) and `\\` continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        lines.append((pending + raw).strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return lines


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        if keyword == "FROM":
            base, _as, name = rest.split()
            assert _as.upper() == "AS", f"every stage is named: {line!r}"
            current = stages[name] = Stage(name=name, base=expand(base, args))
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line!r}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert keyword != "SHELL", "the replay runs RUN with /bin/sh -c, Docker's default shell"
            current.instructions.append(Instruction(keyword, flags, rest))
    return Dockerfile(args=args, stages=stages)


@dataclass
class StageState:
    """What a stage leaves: build args, the image's environment (ENV) and the working directory."""

    args: dict[str, str]
    env: dict[str, str]
    workdir: Path


def _dockerignore_patterns(context: Path) -> list[re.Pattern[str]]:
    """.dockerignore's patterns as regular expressions over context-relative POSIX paths."""
    file = context / ".dockerignore"
    lines = file.read_text().splitlines() if file.exists() else []
    patterns = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions in .dockerignore are not replayed"
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", line.strip("/")):
            if part in ("**/", "**"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += part
            else:
                regex += re.escape(part)
        patterns.append(re.compile(regex))
    return patterns


class Replay:
    """Applies a Dockerfile's stages on this machine with the image's `/` at `root`.

    Absolute paths that the Dockerfile writes in ENV values, WORKDIR and COPY are moved under `root`, so a
    stage's `VIRTUAL_ENV=/opt/venv` becomes `<root>/opt/venv`; the shell commands of RUN see only those
    values (a RUN that names an absolute path of its own would escape the root, so this project's don't).
    """

    def __init__(
        self, dockerfile: Dockerfile, context: Path, root: Path, host_env: Mapping[str, str]
    ) -> None:
        self.dockerfile = dockerfile
        self.context = context
        self.root = root
        self.host_env = dict(host_env)
        self._ignored = _dockerignore_patterns(context)

    def image_path(self, path: str, workdir: Path) -> Path:
        """A path inside the image, absolute or relative to WORKDIR, as a path on this machine (a path
        that came from an ENV value is there already)."""
        if Path(path).is_relative_to(self.root):
            return Path(path)
        return self.root / path.lstrip("/") if path.startswith("/") else workdir / path

    def _rebase(self, literal: str) -> str:
        """An ENV value as written: its absolute paths (also in a `:`-separated list) moved under root."""
        return ":".join(
            str(self.root / item.lstrip("/")) if item.startswith("/") and not item.startswith("//") else item
            for item in literal.split(":")
        )

    def stage(self, name: str, *, run: bool) -> StageState:
        """Apply the stage and the stages below it; RUN executes only when `run` (and only this stage's)."""
        stages = self.dockerfile.chain(name)
        self.root.mkdir(parents=True, exist_ok=True)  # the image's `/`, a RUN's directory before any WORKDIR
        state = StageState(args={}, env={}, workdir=self.root)
        for stage in stages:
            for ins in stage.instructions:
                self._apply(ins, state, run=run and stage is stages[-1])
        return state

    def run_env(self, state: StageState) -> dict[str, str]:
        """The environment a RUN (or the container's process) sees: the host's, then ARGs, then ENV."""
        return {**self.host_env, **state.args, **state.env}

    def _apply(self, ins: Instruction, state: StageState, *, run: bool) -> None:
        scope = self.run_env(state)
        if ins.keyword == "ARG":
            name, sep, default = ins.value.partition("=")
            value = expand(default, scope) if sep else self.dockerfile.args.get(name, "")
            state.args[name] = value
        elif ins.keyword == "ENV":
            for word in shlex.split(ins.value):
                name, sep, literal = word.partition("=")
                assert sep, f"ENV takes NAME=value words: {ins.value!r}"
                state.env[name] = expand(self._rebase(literal), scope)
        elif ins.keyword == "WORKDIR":
            state.workdir = self.image_path(expand(ins.value, scope), state.workdir)
            state.workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            self._copy(ins, state, scope)
        elif ins.keyword == "RUN" and run:
            done = subprocess.run(
                ["/bin/sh", "-c", ins.value],
                cwd=state.workdir,
                env=scope,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, (
                f"RUN {ins.value}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
            )

    def _copy(self, ins: Instruction, state: StageState, scope: Mapping[str, str]) -> None:
        assert not ins.value.startswith("["), "COPY in JSON form is not replayed"
        *sources, dest = (expand(word, scope) for word in shlex.split(ins.value))
        target = self.image_path(dest, state.workdir)
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            if "from" in ins.flags:
                origin = self.image_path(source, self.root)
            else:
                origin = self.context / source
                assert origin.resolve().is_relative_to(self.context.resolve()), (
                    f"{source} is outside the context"
                )
            assert origin.exists(), f"COPY source {source} does not exist ({origin})"
            if origin.is_dir():
                if origin.resolve() != target.resolve():
                    shutil.copytree(origin, target, dirs_exist_ok=True, ignore=self._ignore_for(ins))
            else:
                destination = target / origin.name if into_dir else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)

    def _ignore_for(self, ins: Instruction) -> Callable[[str, list[str]], set[str]] | None:
        if "from" in ins.flags:
            return None

        def ignore(directory: str, names: list[str]) -> set[str]:
            relative = PurePosixPath(Path(directory).relative_to(self.context).as_posix())
            return {
                name
                for name in names
                if any(
                    pattern.fullmatch(str(relative / name).removeprefix("./")) for pattern in self._ignored
                )
            }

        return ignore
