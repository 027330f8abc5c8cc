"""Run the Docker image's entry command outside Docker: the Dockerfile's final-stage ENV, then its CMD.

    python scripts/run_image_entry.py                    # as `docker run` would (binds LOKR_HOST=0.0.0.0)
    LOKR_HOST=127.0.0.1 LOKR_PORT=9000 python scripts/run_image_entry.py

Variables already set in the caller's environment win, as `docker run -e` does. `PATH` gets this interpreter's
bin directory (the image's `/app/.venv/bin`) in front. The image's `LOKR_SERVE_CACHE` (under /home/lokr) is
replaced by `~/.cache/lokr-serve` unless the caller sets it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` pairs, line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            pairs.append((name.upper(), rest.strip()))
    return pairs


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    """The instructions after the last FROM, with those of the stage it builds on (`FROM base-${VARIANT}`)."""
    pairs = instructions(dockerfile)
    starts = [i for i, (name, _) in enumerate(pairs) if name == "FROM"]
    return pairs[starts[-1] + 1 :]


def json_array(arguments: str) -> list[str]:
    """The exec form of CMD / HEALTHCHECK CMD (`["a", "b"]`)."""
    return list(json.loads(arguments[arguments.index("[") :]))


def image_env(dockerfile: str) -> dict[str, str]:
    """The final stage's `ENV KEY=VALUE ...` settings (`$PATH` references left out)."""
    env: dict[str, str] = {}
    for name, arguments in final_stage(dockerfile):
        if name == "ENV":
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                if "$" not in value:
                    env[key] = value
    return env


def image_command(dockerfile: str) -> list[str]:
    """The CMD of the final stage."""
    commands = [arguments for name, arguments in final_stage(dockerfile) if name == "CMD"]
    return json_array(commands[-1])


def entry_environment(dockerfile: str, caller: dict[str, str]) -> dict[str, str]:
    """The image's ENV under the caller's environment (the caller wins, as with `docker run -e`)."""
    image = image_env(dockerfile)
    image["LOKR_SERVE_CACHE"] = str(Path.home() / ".cache" / "lokr-serve")  # the image's is under /home/lokr
    env = {**image, **caller}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), caller.get("PATH", "")])
    return env


def main() -> int:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    command = image_command(dockerfile)
    env = entry_environment(dockerfile, dict(os.environ))
    print("running the image's entry command:", shlex.join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)
    return 1  # pragma: no cover (exec does not return)


if __name__ == "__main__":
    sys.exit(main())
