"""`sweep submission`: an export packed as the challenge's Docker submission.

The directory holds a Dockerfile on a CUDA PyTorch base image, `requirements.txt`
pinned to the versions the export was made with (its environment.json), the
export itself (`export/`), the code `sweep serve` runs (`app/`: the sweep,
trainer and evaluator packages) and `start.sh`, the image's command: the same
`sweep serve`, reading its host and port from HOST and PORT (0.0.0.0 and 80 in the
image: the container is the boundary, and `docker run -p 127.0.0.1:8080:80` keeps
the host's side on loopback). `start.sh` runs the same outside Docker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# A CUDA build of PyTorch: the image keeps its torch (requirements.txt pins everything else).
BASE_IMAGE = "pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime"
PACKAGES = ("sweep", "trainer", "evaluator")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


class SubmissionError(ValueError):
    """An export that cannot be packed, or an --out that may not be written."""


def write_submission(export_dir: Path, out: Path, merged: bool = False, force: bool = False) -> Path:
    """Writes the Docker submission of `export_dir` into `out` (new or empty, or replaced with `force`),
    all or nothing, as `sweep export` writes an export (`sweep.export.check_out`, `move_into_place`)."""
    from sweep.export import check_out, move_into_place, ordinary_modes

    try:
        check_out(out, force)
    except ValueError as e:
        raise SubmissionError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.submission-", dir=out.parent))
    try:
        shutil.copytree(export_dir, staging / "export", ignore=IGNORED)
        app = staging / "app"
        for package in PACKAGES:
            shutil.copytree(_package_dir(package), app / package, ignore=IGNORED)
        configs = _package_dir("sweep.configs")
        if configs.resolve() != (app / "sweep" / "configs").resolve():
            shutil.copytree(configs, app / "sweep" / "configs", ignore=IGNORED, dirs_exist_ok=True)
        (staging / "requirements.txt").write_text(requirements(export_dir))
        (staging / "start.sh").write_text(start_script(merged))
        (staging / "Dockerfile").write_text(dockerfile())
        (staging / ".dockerignore").write_text("**/__pycache__\n")
        ordinary_modes(staging)
        (staging / "start.sh").chmod((staging / "start.sh").stat().st_mode | 0o111)  # the image's command
        move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def requirements(export_dir: Path) -> str:
    """requirements.txt: each package `sweep serve` needs at the version the export recorded (torch left to
    the base image); an export without environment.json gets this environment's versions."""
    from sweep.submission import package_versions

    try:
        recorded = json.loads((export_dir / "environment.json").read_text())["packages"]
        source = "the versions the export was made with (export/environment.json)"
    except (OSError, ValueError, KeyError):
        recorded = package_versions()["packages"]
        source = "the versions installed where `sweep submission` ran (the export recorded none)"
    lines = [f"# {source}; torch comes with the base image"]
    lines += [f"{name}=={version}" for name, version in sorted(recorded.items()) if name != "torch"]
    return "\n".join(lines) + "\n"


def start_script(merged: bool) -> str:
    flag = " --merged" if merged else ""
    return f"""#!/bin/sh
# The submission's server: `sweep serve` on export/, at $HOST:$PORT (the image sets 0.0.0.0 and 80).
cd "$(dirname "$0")"
export PYTHONPATH="$PWD/app${{PYTHONPATH:+:$PYTHONPATH}}"
exec python -m sweep.cli serve export{flag} --host "${{HOST:-0.0.0.0}}" --port "${{PORT:-80}}"
"""


def dockerfile() -> str:
    return f"""# The challenge's submission: `sweep serve` on the exported trial, answering HELM's HTTP model client.
#   docker build -t my-submission .
#   docker run --gpus all -p 127.0.0.1:8080:80 my-submission
ARG BASE_IMAGE={BASE_IMAGE}
FROM ${{BASE_IMAGE}}
WORKDIR /submission
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENV HOST=0.0.0.0 PORT=80 PYTHONUNBUFFERED=1
EXPOSE 80
CMD ["./start.sh"]
"""


def _package_dir(name: str) -> Path:
    import importlib

    module = importlib.import_module(name)
    return Path(next(iter(module.__path__)))
