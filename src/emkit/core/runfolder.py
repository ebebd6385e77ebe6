"""The run folder: layout, manifest (config hash, versions, seeds, git commit, timings), atomic writes, resume.

A run folder is finished only when its manifest says `"status": "complete"`, and the manifest is
always written last and atomically, so a crash never leaves a folder that looks finished. Every
file a stage produces is written to a temporary name and renamed into place.

One process at a time: `RunFolder.open` takes an exclusive OS lock (`flock`) on `<run>/.emkit.lock`
before it reads or writes anything, and holds it until the run completes, fails or the process
ends (the kernel drops it with the process, so a killed run never leaves a stale lock). A second
process on the same folder is refused with one line naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
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
from emkit.core.config import StrictModel, config_hash, diff_configs, dump_yaml
from emkit.core.errors import EmkitError, RunFolderError

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
LOCK = ".emkit.lock"
_HELD: dict[Path, int] = {}  # run folder -> descriptor of its lock file, for the locks this process holds
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


def atomic_write_parquet(path: Path, frame: Any) -> None:
    """Write a DataFrame as Parquet atomically (see `atomic_write_bytes`), without its index."""
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


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


def acquire_lock(folder: Path) -> None:
    """Hold the folder's exclusive lock (idempotent within a process); a second process gets RunFolderError."""
    folder = folder.resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot create the run lock: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(50):  # the holder writes its pid just after it takes the lock: give it a moment
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            if holder:
                break
            time.sleep(0.02)
        os.close(fd)
        holder = holder or "pid unknown"
        raise RunFolderError(f"{folder}: another emkit process ({holder}) is running this run folder; wait for it "
                             "or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[folder] = fd


def release_lock(folder: Path) -> None:
    """Let go of the folder's lock, if this process holds it."""
    fd = _HELD.pop(folder.resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds_lock(folder: Path) -> bool:
    """Whether this process holds the folder's lock."""
    return folder.resolve() in _HELD


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
        """Start or resume a run of `config` here: 'new', 'resume' (partial run, same config) or 'complete'.

        With `main_process` the folder's lock is taken first and held while the run goes on; without it
        (a look at whether the run is complete, or a non-main rank of a distributed job) nothing is written.
        """
        if main_process:
            acquire_lock(self.path)
        try:
            manifest = self.read_manifest()
            digest = config_hash(config)
            if manifest is None and self._has_content() and not overwrite:
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
                    if main_process:
                        release_lock(self.path)
                    return "complete"
            if not main_process:
                return "new" if manifest is None else "resume"
            if manifest is not None and overwrite:
                self._clear()
                manifest = None
            self.path.mkdir(parents=True, exist_ok=True)
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
            # The manifest first: a run that dies before config.yaml is written is still recognised as its own.
            self.write_manifest(manifest)
            atomic_write_text(self.path / CONFIG, dump_yaml(config))
            return state
        except BaseException:
            if main_process:
                release_lock(self.path)  # refused or failed: the folder is not ours to hold
            raise

    def reopen(self, reason: str) -> None:
        """Take a complete run back to running (under the lock) because a file of it is damaged."""
        acquire_lock(self.path)
        manifest = self.read_manifest() or {}
        manifest["status"] = "running"
        manifest.setdefault("repairs", []).append({"at": now(), "reason": reason})
        self.write_manifest(manifest)

    def _has_content(self) -> bool:
        return self.path.is_dir() and any(p.name != LOCK for p in self.path.iterdir())

    def _clear(self) -> None:
        """Remove everything in the folder but its lock (which this process holds)."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

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
            entry = {**record, "status": status, "started": started, "finished": now(), "seconds": seconds,
                     "seconds_total": total}
            try:
                self._set_stage(name, entry, run_status=None if status == "complete" else status)
            except EmkitError:
                if status == "complete":
                    raise
                # The stage's own error (e.g. the file a full disk refused) is the one to report, not the
                # manifest that could not be updated after it.
            if status != "complete":
                release_lock(self.path)

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
        release_lock(self.path)
