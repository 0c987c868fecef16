"""A run's output dir: who may write into it, its metrics log, and the final export.

    OUT/.lmprune.lock     advisory lock (fcntl) held by the run's rank 0 while it runs; holds its pid
    OUT/run_config.json   the resolved config (a resumed run must match it)
    OUT/metrics.jsonl     one JSON object per logged step
    OUT/checkpoints/      see checkpoint.py
    OUT/final/            HF dir of the trained model (OUT/final-sparse/: bitmask + values)
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from pathlib import Path

import torch

from lmprune.atomic import atomic_dir, disk_full_is_user_error, pid_alive, remove_stale_leftovers, write_text
from lmprune.checkpoint import check_finite
from lmprune.data import PreparedData
from lmprune.errors import UserError
from lmprune.pruning.sparse.export import save_compact
from lmprune.pruning.sparse.masks import DEFAULT_PATTERNS

# Config fields that may differ between a run and its resumption (they change no numbers).
RESUME_FREE_KEYS = {("train", "save_every"), ("train", "log_every"), ("train", "eval_every"),
                    ("train", "keep_last"), ("train", "sample_tokens"), ("out_dir",)}

# Keys added after runs were made: an older run_config.json without them meant these values.
ADDED_KEYS = {("train", "parallel"): "ddp", ("train", "activation_checkpointing"): False}


def check_out_dir(out_dir: Path, run_config: dict, resume: bool) -> None:
    """Refuse an output dir that holds another run (or this one, without --resume)."""
    saved = out_dir / "run_config.json"
    if not saved.is_file():
        if out_dir.is_dir() and any(p.name in {"metrics.jsonl", "checkpoints", "final"} for p in out_dir.iterdir()):
            raise UserError(f"{out_dir} holds files of another run (no run_config.json); choose another --out")
        return
    if not resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    previous = json.loads(saved.read_text())
    for section, values in run_config.items():
        if not isinstance(values, dict):
            if (section,) not in RESUME_FREE_KEYS and previous.get(section) != values:
                raise UserError(f"{out_dir} holds another run ({section} differs); choose another --out")
            continue
        for key, value in values.items():
            before = previous.get(section, {}).get(key, ADDED_KEYS.get((section, key)))
            if (section, key) not in RESUME_FREE_KEYS and before != value:
                raise UserError(f"{out_dir} holds another run ({section}.{key}: {previous.get(section, {}).get(key)!r}"
                                f" there, {value!r} now); choose another --out")


LOCK_FILE = ".lmprune.lock"


class RunLock:
    """One run per output dir: an exclusive, non-blocking `fcntl.flock` on OUT/.lmprune.lock.

    The kernel drops the lock when the holder dies, so a lock file left by a dead pid is simply taken
    over (with a warning). `release(cleanup=True)` after a failed setup removes what `acquire` created,
    so a run that never started leaves --out as it found it."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.path = out_dir, out_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        missing = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"--out {self.out_dir}: a file is in the way (not a directory)") from None
        except OSError as error:
            raise UserError(f"--out {self.out_dir}: cannot create it ({error.strerror})") from None
        self._created = sorted(missing, key=lambda p: len(p.parts), reverse=True)
        existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"--out {self.out_dir}: not writable ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.out_dir} is in use by another lmprune run (pid {holder}); "
                            "wait for it to end or choose another --out") from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not pid_alive(int(previous)):
            warnings.warn(f"{self.out_dir}: taking over the lock left by pid {previous}, which is not running",
                          stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        if not existed:
            self._created.insert(0, self.path)
        return self

    def release(self, cleanup: bool = False) -> None:
        """Unlock; with `cleanup`, remove the lock file and dirs this acquire created (when empty)."""
        if self._fd is None:
            return
        if cleanup:
            for path in self._created:
                try:
                    path.unlink() if path == self.path else path.rmdir()
                except OSError:
                    break
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


def clean_leftovers(out_dir: Path) -> None:
    """Temp dirs of killed runs (dead pids) in OUT/ and OUT/checkpoints/ (call while holding the lock)."""
    removed = remove_stale_leftovers(out_dir) + remove_stale_leftovers(out_dir / "checkpoints")
    if removed:
        warnings.warn(f"removed {len(removed)} temp dir(s) left by killed runs: "
                      f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}", stacklevel=2)


class MetricsLog:
    """Appends one JSON object per logged step to OUT/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            write_text(path, "".join(json.dumps(row) + "\n" for row in read_rows(path, up_to_step=resume_step)))

    def write(self, row: dict) -> None:
        if self.enabled:
            from lmprune.atomic import crash_point  # (local: crash tests only; an already-imported module)

            line = json.dumps(row) + "\n"
            with open(self.path, "a") as f:
                f.write(line[:len(line) // 2])
                f.flush()  # a kill at the crash point leaves a torn line on disk, as a real one would
                crash_point("metrics.mid_line")
                f.write(line[len(line) // 2:])


def read_rows(path: Path, up_to_step: int | None = None) -> list[dict]:
    """The rows of a metrics.jsonl. A line that is not JSON (a write torn by a kill or a full disk) is
    dropped with a warning; with `up_to_step`, rows past it (written by a run that died after its last
    checkpoint) are dropped too."""
    rows, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(row, dict) and (up_to_step is None or row.get("step", 0) <= up_to_step):
            rows.append(row)
    if torn:
        warnings.warn(f"{path}: dropped {torn} torn line(s) (an interrupted write)", stacklevel=2)
    return rows


def export_final(model: torch.nn.Module, data: PreparedData, final_dir: Path, sparse: bool = False,
                 patterns: tuple[str, ...] | list[str] | None = None) -> None:
    """OUT/final: a HF dir (config, safetensors, tokenizer) that loads with no lmprune import.

    With `sparse`, OUT/final-sparse holds the same model as bitmask + nonzero values
    (model.sparse.safetensors, which `lmprune eval` and `load_hf_model` read back bit-exactly).
    """
    check_finite(model.state_dict().items(), f"export {final_dir}: weight")
    with disk_full_is_user_error(final_dir), atomic_dir(final_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        data.load_tokenizer().save_pretrained(tmp)
    if sparse:
        sparse_dir = final_dir.with_name(final_dir.name + "-sparse")
        with disk_full_is_user_error(sparse_dir), atomic_dir(sparse_dir) as tmp:
            model.config.save_pretrained(tmp)
            save_compact(model, tmp, patterns or DEFAULT_PATTERNS)
            data.load_tokenizer().save_pretrained(tmp)
