"""The run folder: layout, manifest (config hash, versions, seeds, git commit, timings), atomic writes, resume.

A run folder is finished only when its manifest says `"status": "complete"`, and the manifest is
always written last and atomically, so a crash never leaves a folder that looks finished. Every
file a stage produces is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from emkit import __version__
from emkit.config import StrictModel, config_hash, diff_configs, dump_yaml
from emkit.errors import EmkitError, RunFolderError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "gguf", "numpy")


def now() -> str:
    """Current UTC time, ISO 8601, second precision."""
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def _disk_error(path: Path, exc: OSError) -> EmkitError:
    if exc.errno == errno.ENOSPC:
        return EmkitError(f"{path}: disk full while writing; finished files were kept, free space and re-run to resume")
    return EmkitError(f"{path}: cannot write: {exc.strerror or exc}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to `path` via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, exc) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (see `atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {"emkit": __version__, "python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_state(path: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout containing `path`, or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def provenance() -> dict[str, Any]:
    """Versions, platform and git commits (of emkit's source and of the working directory)."""
    source = Path(__file__).resolve().parent
    info: dict[str, Any] = {
        "versions": package_versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "host": socket.gethostname()},
        "git": {"emkit": git_state(source), "cwd": git_state(Path.cwd())},
        "command": sys.argv,
    }
    try:
        import torch

        info["platform"]["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        if torch.cuda.is_available():
            info["platform"]["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunFolder:
    """One run's folder: `config.yaml`, `manifest.json` and the stages' outputs."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder has none yet."""
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{self.manifest_path}: unreadable manifest ({exc}); move the folder away") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically, stamping the update time."""
        manifest["updated"] = now()
        atomic_write_json(self.manifest_path, manifest)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge top-level fields into the manifest."""
        manifest = self.read_manifest() or {}
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    def open(
        self, kind: str, config: StrictModel, *, overwrite: bool = False, main_process: bool = True
    ) -> Literal["new", "resume", "complete"]:
        """Start or resume a run of `config` here: 'new', 'resume' (partial run, same config) or 'complete'."""
        manifest = self.read_manifest()
        digest = config_hash(config)
        if manifest is None and self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise RunFolderError(
                f"{self.path}: folder exists, is not empty and holds no emkit manifest; choose another --output"
            )
        if manifest is not None and not overwrite:
            if manifest.get("kind") != kind:
                raise RunFolderError(f"{self.path}: holds a '{manifest.get('kind')}' run, not '{kind}'")
            if manifest.get("config_hash") != digest:
                changes = diff_configs(
                    {k: v for k, v in (manifest.get("config") or {}).items() if k not in config.NON_RESULT_FIELDS},
                    {k: v for k, v in config.model_dump(mode="json").items() if k not in config.NON_RESULT_FIELDS},
                )
                raise RunFolderError(
                    f"{self.path}: holds a run with another config ({'; '.join(changes[:4]) or 'hash differs'}); "
                    "choose another --output or pass --overwrite"
                )
            if manifest.get("status") == "complete":
                return "complete"
            pid, host = manifest.get("pid"), manifest.get("platform", {}).get("host")
            if (
                main_process
                and manifest.get("status") == "running"
                and host == socket.gethostname()
                and isinstance(pid, int)
                and pid != os.getpid()
                and pid_alive(pid)
            ):
                raise RunFolderError(f"{self.path}: another emkit process (pid {pid}) is running this run")
        if not main_process:
            return "new" if manifest is None else "resume"
        if manifest is not None and overwrite:
            shutil.rmtree(self.path)
            manifest = None
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, dump_yaml(config))
        state: Literal["new", "resume"] = "new" if manifest is None else "resume"
        fresh = provenance()
        manifest = manifest or {"kind": kind, "created": now(), "stages": {}}
        manifest.update(
            emkit_version=__version__,
            status="running",
            pid=os.getpid(),
            config_hash=digest,
            config=config.model_dump(mode="json"),
            **fresh,
        )
        manifest.setdefault("attempts", 0)
        manifest["attempts"] += 1
        self.write_manifest(manifest)
        return state

    @contextlib.contextmanager
    def stage(self, name: str, enabled: bool = True) -> Iterator[dict[str, Any]]:
        """Record a stage's status and timing; yields a dict whose contents are saved with it."""
        record: dict[str, Any] = {}
        if not enabled:
            yield record
            return
        started, t0 = now(), time.monotonic()
        manifest = self.read_manifest() or {}
        previous = manifest.get("stages", {}).get(name, {})
        self._set_stage(name, {**previous, "status": "running", "started": started})
        status = "complete"
        try:
            yield record
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException as exc:
            status = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            seconds = round(time.monotonic() - t0, 2)
            total = round(previous.get("seconds_total", 0.0) + seconds, 2)
            self._set_stage(
                name,
                {**record, "status": status, "started": started, "finished": now(), "seconds": seconds,
                 "seconds_total": total},
                run_status=None if status == "complete" else status,
            )

    def _set_stage(self, name: str, record: dict[str, Any], run_status: str | None = None) -> None:
        manifest = self.read_manifest() or {}
        manifest.setdefault("stages", {})[name] = record
        if run_status is not None:
            manifest["status"] = run_status
        self.write_manifest(manifest)

    def complete(self, **results: Any) -> None:
        """Mark the run finished: the last write of a successful run."""
        manifest = self.read_manifest() or {}
        manifest.setdefault("results", {}).update(results)
        manifest["status"] = "complete"
        manifest["finished"] = now()
        self.write_manifest(manifest)
