"""Kill lmprune runs N times at random places and check that they still end exactly as an uninterrupted run.

    python scripts/crash_grid.py --kills N --seed S [--jobs J] [--work DIR] [--keep]

Three scenarios, each run once uninterrupted (the reference) and once killed N times:
  idea     an IDEA run that prunes and compacts its FFN mid-run (enlarged 2x, window [25%, 50%])
  mgpp     MGPP fine-tuning of a dense model that the script trains once at the start (model.path)
  compare  `lmprune compare` of two runs (scratch, idea)
A kill is drawn with random.Random("<seed>:<scenario>"): either a SIGKILL after a random wall-clock
delay (uniform over the reference's duration), or a fault-injection point of lmprune.atomic
(LMPRUNE_CRASH_AT=<site>:<n>: the n-th call of that site SIGKILLs the process) -- inside checkpoint
writes, run_config.json / summary / plot writes, metrics.jsonl rows and old-checkpoint deletion. n is
uniform up to ~2 x (calls of that site a restart still makes, counted in the reference) / (kills left
+ 1): it is reached, and the kills spread over the run. After each kill the run is started again
(`train --resume`, or the same `compare` command); a draw that the run outlives (it ended first) is
a miss and is drawn again; once the run has finished, its restarts (which redo the final export and
summary) are the targets. When N kills have landed the run goes to the end. Checks: every
final/model.safetensors bit-identical to the reference's (torch.equal on every tensor); every
metrics.jsonl line parses and holds the reference's logged steps, each exactly once; no leftover
`.*.tmp-*` / `.*.old-*` / `.*.deleting-*` anywhere in the run's dir. Exit 0 only if every scenario
passes. Children run `sys.executable -m lmprune` with OMP_NUM_THREADS=1 and a timeout each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SITES = ("atomic_dir.filled", "atomic_dir.before_rename", "atomic_file.before_replace", "remove_tree.renamed",
         "metrics.mid_line")
TIMED_SHARE = 1 / 3  # the rest of the kills are crash points
LEFTOVER = re.compile(r"^\..+\.(tmp|old|deleting)-\d+$")
CRASH_LINE = re.compile(r"LMPRUNE_CRASH_AT: SIGKILL at (\S+) #(\d+)")

WORDS = ("the king queen lord lady castle sword horse night day love war crown speak hath thou thee "
         "doth fair foul heart death life gold silver field river storm sea ship wind fire blood "
         "honour shame friend enemy wise fool young old sweet bitter").split()

# The reference runs under this wrapper: it counts the calls of every crash point (the run is otherwise
# the plain CLI), so that a drawn n is one the run reaches.
COUNTER = r"""
import atexit, collections, json, os, sys
import lmprune.atomic as atomic
counts = collections.Counter()
def crash_point(site):
    counts[site] += 1
atomic.crash_point = crash_point
def dump():
    with open(os.environ["CRASH_GRID_COUNTS"], "w") as f:
        json.dump(counts, f)
atexit.register(dump)
from lmprune.cli import main
sys.exit(main(sys.argv[1:]))
"""

PRINT_LOCK = threading.Lock()


def say(line: str) -> None:
    with PRINT_LOCK:
        print(line, flush=True)


# ----------------------------------------------------------------------------- corpus and configs

def write_corpus(root: Path, n_docs: int = 24, lines_per_doc: int = 60, seed: int = 0) -> None:
    """Deterministic pseudo-English documents (the same recipe as the tests' corpus)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        lines = []
        for _ in range(lines_per_doc):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?"]))
        (root / f"doc{d:03d}.txt").write_text("\n".join(lines) + "\n")


def base_config(prepared: Path, **train) -> dict:
    return {
        "data": {"prepared_dir": str(prepared)},
        "model": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                  "num_heads": 4, "num_kv_heads": 2},
        "train": {"steps": 40, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "lr_end": 3e-4, "warmup": 2,
                  "eval_every": 10, "eval_tokens": 512, "log_every": 1, "save_every": 4, "keep_last": 2,
                  "dtype": "fp32", "threads": 1, "sample_tokens": 0, **train},
    }


def idea_config(prepared: Path) -> dict:
    raw = base_config(prepared)
    raw["pipeline"] = {"name": "idea", "enlarge": 2.0, "prune_start": 0.25, "prune_span": 0.25, "prune_every": 2}
    return raw


def dense_config(prepared: Path) -> dict:
    return base_config(prepared, steps=20, eval_every=0, save_every=0)


def mgpp_config(prepared: Path, dense_final: Path) -> dict:
    raw = base_config(prepared, warmup=0, lr=5e-4, lr_end=5e-5)
    raw["model"] = {"path": str(dense_final), "preset": None}
    raw["mgpp"] = {"warmup_steps": 4, "s_i": 0.5, "s_f": 0.8, "cubic_steps": 20, "dt": 4}
    return raw


def compare_config(prepared: Path) -> dict:
    raw = idea_config(prepared)
    raw["compare"] = {"runs": {"scratch": {"pipeline.name": "scratch"}, "idea": {"pipeline.name": "idea"}},
                      "scratch_equal_compute": False, "infer_batch_size": 2, "infer_seq_len": 32}
    return raw


# ----------------------------------------------------------------------------- children

def child_env(crash_at: str | None = None, counts: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LMPRUNE_CRASH_AT", None)
    if crash_at:
        env["LMPRUNE_CRASH_AT"] = crash_at
    if counts:
        env["CRASH_GRID_COUNTS"] = str(counts)
    return env


@dataclass
class Outcome:
    rc: int
    seconds: float
    log: Path

    def tail(self, lines: int = 12) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return "\n".join("      | " + line for line in text[-lines:])


def launch(args: list[str], log: Path, env: dict, timeout: float, kill_after: float | None = None,
           wrapper: str | None = None) -> Outcome:
    """Run `python -m lmprune ARGS` (or `python -c WRAPPER ARGS`), output to `log`; SIGKILL it after
    `kill_after` seconds when it is still running. A run past `timeout` is killed and reported as rc 124."""
    cmd = [sys.executable, "-c", wrapper, *args] if wrapper else [sys.executable, "-m", "lmprune", *args]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if kill_after is not None:
                try:
                    proc.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    return Outcome(rc, time.monotonic() - t0, log)


# ----------------------------------------------------------------------------- what is on disk

def complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "manifest.json").is_file())


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / "final" / "config.json").is_file()


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(rows that parse, lines that do not)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return rows, bad


def leftovers(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if LEFTOVER.match(name):
                found.append(str((Path(dirpath) / name).relative_to(root)))
        dirnames[:] = [d for d in dirnames if not LEFTOVER.match(d)]  # not inside a leftover
    return sorted(found)


def leftover_meaning(rel: str) -> str:
    """`checkpoints/.step-000012.tmp-77` -> `write of checkpoints/step-000012`."""
    path = Path(rel)
    match = re.match(r"^\.(.+)\.(tmp|old|deleting)-\d+$", path.name)
    what = {"tmp": "write", "old": "replace", "deleting": "deletion"}[match.group(2)]
    return f"{what} of {path.parent / match.group(1) if str(path.parent) != '.' else match.group(1)}"


# ----------------------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    verb: str  # train | compare
    config: Path
    steps: int
    run_names: list[str]  # run dirs inside the output dir ("." for a train run)
    setup: object = None  # callable run before the reference (the mgpp dense model)

    def args(self, out: Path, restart: bool) -> list[str]:
        args = [self.verb, str(self.config), "--out", str(out), "--quiet"]
        return args + ["--resume"] if restart and self.verb == "train" else args

    def run_dirs(self, out: Path) -> list[Path]:
        return [out / name for name in self.run_names]


@dataclass
class Result:
    name: str
    ok: bool = False
    landed: int = 0
    missed: int = 0
    problems: list[str] = field(default_factory=list)
    where: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def progress(sc: Scenario, out: Path) -> float:
    """The share of the scenario's steps done on disk (a finished run counts whole)."""
    done = [1.0 if finished(d) else (complete_steps(d) or [0])[-1] / sc.steps for d in sc.run_dirs(out)]
    return sum(done) / len(done)


def describe(sc: Scenario, out: Path) -> tuple[str, dict[str, str]]:
    """One line on the run's state on disk, and the interrupted writes it shows ({key: meaning}; the key
    names the very leftover or torn file, so an older one is told apart from a new one)."""
    parts, marks = [], {}
    for run_dir in sc.run_dirs(out):
        label = "" if run_dir == out else f"{run_dir.name}: "
        if finished(run_dir):
            state = "finished"
        else:
            steps = complete_steps(run_dir)
            rows, bad = read_metrics(run_dir / "metrics.jsonl")
            last = rows[-1]["step"] if rows else None
            state = f"ckpt {steps[-1] if steps else '-'}, metrics to {last if rows else '-'}"
            if bad:
                state += f" + {bad} torn line"
                size = (run_dir / "metrics.jsonl").stat().st_size
                marks[f"{run_dir}/metrics.jsonl@{size}"] = f"metrics.jsonl row ({label}after step {last or 0})"
        parts.append(label + state)
    marks.update({rel: leftover_meaning(rel) for rel in leftovers(out)})
    return "; ".join(parts), marks


def remaining_calls(sc: Scenario, out: Path, counts: dict[str, int], finish_counts: dict[str, int] | None
                    ) -> dict[str, float]:
    """About how many calls of each crash point a restart makes from the state on disk."""
    done = progress(sc, out)
    if done >= 1.0 and finish_counts is not None:
        return {site: float(finish_counts.get(site, 0)) for site in SITES}
    return {site: counts.get(site, 0) * (1.0 - done) for site in SITES}


def draw_kill(rng: random.Random, remaining: dict[str, float], ref_seconds: float,
              kills_left: int) -> tuple[float | None, str | None]:
    """(delay, None) for a timed kill, (None, "site:n") for a crash point. Every draw takes the same four
    numbers from `rng`, so a seed gives the same sequence of draws whatever the runs did."""
    kind, delay, which, position = rng.random(), rng.random(), rng.random(), rng.random()
    sites = [site for site in SITES if remaining.get(site, 0) > 0]
    if kind < TIMED_SHARE or not sites:
        return delay * ref_seconds, None
    site = sites[int(which * len(sites))]
    cap = max(1, math.ceil(2 * remaining[site] / (kills_left + 1)))  # spread the kills over what is left
    return None, f"{site}:{1 + int(position * cap)}"


def run_scenario(sc: Scenario, work: Path, kills: int, seed: int) -> Result:
    result, t_start = Result(sc.name), time.monotonic()
    try:
        _run_scenario(sc, work / sc.name, kills, seed, result)
    except Exception as error:  # a bug of this script: report it as the scenario's failure
        result.problems.append(f"crash_grid error: {type(error).__name__}: {error}")
    result.seconds = time.monotonic() - t_start
    result.ok = not result.problems
    return result


def _run_scenario(sc: Scenario, root: Path, kills: int, seed: int, result: Result) -> None:
    root.mkdir(parents=True)
    logs = root / "logs"
    logs.mkdir()
    if sc.setup is not None:
        sc.setup(logs)
    ref, out = root / "reference", root / "killed"
    counts_file = root / "reference-counts.json"
    first = launch(sc.args(ref, False), logs / "reference.log", child_env(counts=counts_file), 900, wrapper=COUNTER)
    if first.rc != 0:
        result.problems.append(f"the reference run failed (rc {first.rc}):\n{first.tail()}")
        return
    counts = json.loads(counts_file.read_text())
    say(f"[{sc.name}] reference: {first.seconds:.1f}s; crash-point calls: "
        + ", ".join(f"{site} {counts.get(site, 0)}" for site in SITES))
    timeout = 120 + 8 * first.seconds

    rng = random.Random(f"{seed}:{sc.name}")
    finish_counts = None  # the calls a restart of a finished run makes: measured when first needed
    attempt, max_attempts = 0, 4 * kills + 10
    while result.landed < kills and attempt < max_attempts:
        attempt += 1
        if finish_counts is None and progress(sc, out) >= 1.0:
            again = launch(sc.args(ref, True), logs / "reference-again.log", child_env(counts=counts_file),
                           timeout, wrapper=COUNTER)
            if again.rc != 0:
                result.problems.append(f"re-running the finished reference failed (rc {again.rc}):\n{again.tail()}")
                return
            finish_counts = json.loads(counts_file.read_text())
            say(f"[{sc.name}] the run has finished; a restart of a finished run calls: "
                + ", ".join(f"{site} {finish_counts.get(site, 0)}" for site in SITES))
        remaining = remaining_calls(sc, out, counts, finish_counts)
        delay, crash_at = draw_kill(rng, remaining, first.seconds, kills - result.landed)
        how = f"SIGKILL after {delay:.2f}s" if crash_at is None else f"crash point {crash_at.replace(':', ' #')}"
        _, before = describe(sc, out)
        run = launch(sc.args(out, attempt > 1), logs / f"attempt-{attempt:03d}.log", child_env(crash_at), timeout,
                     kill_after=delay)
        tag = f"[{sc.name}] kill {result.landed + 1}/{kills} (try {attempt}): {how}"
        if run.rc == 0:
            result.missed += 1
            say(f"{tag}: missed, the run ended first ({run.seconds:.1f}s); drawing again")
            continue
        if run.rc != -signal.SIGKILL:
            result.problems.append(f"restart {attempt} ({how}) failed with rc {run.rc} -- a resume that should have "
                                   f"worked did not (log {run.log}):\n{run.tail()}")
            say(f"{tag}: FAILED rc {run.rc}")
            return
        if crash_at is not None and not CRASH_LINE.search(run.log.read_text(errors="replace")):
            result.problems.append(f"restart {attempt}: killed by SIGKILL but not at {crash_at} (log {run.log})")
            return
        result.landed += 1
        state, after = describe(sc, out)
        hits = [meaning for key, meaning in after.items() if key not in before]  # not an older leftover
        for hit in hits or ["no write in flight"]:
            kind = re.sub(r"step-\d+", "step-*", hit.split(" (")[0])
            for name in sc.run_names:  # one tally for every run of a compare
                kind = kind.replace(f" of {name}/", " of ")
            result.where[kind] = result.where.get(kind, 0) + 1
        say(f"{tag}: killed at {run.seconds:.1f}s in {', '.join(hits) if hits else 'no write in flight'}"
            f" | {state}")
    if result.landed < kills:
        result.problems.append(f"only {result.landed} of {kills} kills landed in {attempt} tries")

    last = launch(sc.args(out, True), logs / "final.log", child_env(), timeout)
    say(f"[{sc.name}] run to the end: rc {last.rc}, {last.seconds:.1f}s")
    if last.rc != 0:
        result.problems.append(f"the run to the end failed (rc {last.rc}, log {last.log}):\n{last.tail()}")
        return
    check(sc, ref, out, result)


def check(sc: Scenario, ref: Path, out: Path, result: Result) -> None:
    import torch
    from safetensors.torch import load_file

    for ref_dir, run_dir in zip(sc.run_dirs(ref), sc.run_dirs(out)):
        label = "" if run_dir == out else f"{run_dir.name}: "
        weights = run_dir / "final" / "model.safetensors"
        if not weights.is_file():
            result.problems.append(f"{label}no final/model.safetensors")
        else:
            a, b = load_file(ref_dir / "final" / "model.safetensors"), load_file(weights)
            differ = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
            if a.keys() != b.keys():
                result.problems.append(f"{label}final weights have other tensors: {sorted(a.keys() ^ b.keys())[:4]}")
            elif differ:
                result.problems.append(f"{label}final weights differ in {len(differ)} tensors ({differ[0]}, ...)")
        ref_rows, _ = read_metrics(ref_dir / "metrics.jsonl")
        rows, bad = read_metrics(run_dir / "metrics.jsonl")
        want, got = [r["step"] for r in ref_rows], [r.get("step") for r in rows]
        if bad:
            result.problems.append(f"{label}metrics.jsonl has {bad} line(s) that do not parse")
        dupes = sorted({s for s in got if got.count(s) > 1})
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        if dupes or missing or extra or got != want:
            result.problems.append(f"{label}metrics.jsonl steps: duplicated {dupes[:8]}, missing {missing[:8]}, "
                                   f"unexpected {extra[:8]}" + ("" if dupes or missing or extra else ", out of order"))
        elif [(r.get("loss"), r.get("val_loss")) for r in rows] != [(r.get("loss"), r.get("val_loss"))
                                                                  for r in ref_rows]:
            result.problems.append(f"{label}metrics.jsonl losses differ from the reference's")
    left = leftovers(out)
    if left:
        result.problems.append(f"leftovers remain: {', '.join(left[:6])}")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=3, help="kills per scenario (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill draws (default 0)")
    p.add_argument("--jobs", type=int, default=min(3, os.cpu_count() or 1),
                   help="scenarios at a time (default: min(3, CPU cores))")
    p.add_argument("--only", nargs="+", choices=["idea", "mgpp", "compare"], help="run only these scenarios")
    p.add_argument("--work", type=Path, help="work dir (default: a temp dir, removed when all pass)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args(argv)
    if args.kills < 0 or args.jobs < 1:
        p.error("--kills must be >= 0 and --jobs >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="crash_grid-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"crash_grid: {work} is not empty", file=sys.stderr)
        return 2
    say(f"crash_grid: {args.kills} kills per scenario, seed {args.seed}, work dir {work}")

    from lmprune.data import prepare_corpus

    write_corpus(work / "texts")
    prepared = prepare_corpus(str(work / "texts"), work / "prepared", vocab_size=300, tokenizer=None,
                              val_fraction=0.1, seed=0)
    configs = work / "configs"
    configs.mkdir()

    def config(name: str, raw: dict) -> Path:
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    dense = work / "dense"

    def train_dense(logs: Path) -> None:
        run = launch(["train", str(config("dense", dense_config(prepared))), "--out", str(dense), "--quiet"],
                     logs / "dense.log", child_env(), 900)
        if run.rc != 0:
            raise RuntimeError(f"training the dense model failed (rc {run.rc}):\n{run.tail()}")
        say(f"[mgpp] dense model trained: {run.seconds:.1f}s")

    scenarios = [
        Scenario("idea", "train", config("idea", idea_config(prepared)), 40, ["."]),
        Scenario("mgpp", "train", config("mgpp", mgpp_config(prepared, dense / "final")), 40, ["."],
                 setup=train_dense),
        Scenario("compare", "compare", config("compare", compare_config(prepared)), 40, ["scratch", "idea"]),
    ]
    scenarios = [sc for sc in scenarios if not args.only or sc.name in args.only]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda sc: run_scenario(sc, work, args.kills, args.seed), scenarios))

    print()
    for r in results:
        if r.ok:
            print(f"{r.name}: survived {r.landed}/{args.kills} kills, final weights identical, metrics complete"
                  f" ({r.missed} missed draws, {r.seconds:.0f}s)")
        else:
            print(f"{r.name}: FAILED after {r.landed}/{args.kills} kills: " + "; ".join(r.problems))
    where: dict[str, int] = {}
    for r in results:
        for kind, n in r.where.items():
            where[kind] = where.get(kind, 0) + n
    print("kills landed in: " + ", ".join(f"{kind} {n}" for kind, n in sorted(where.items(), key=lambda x: -x[1])))
    passed = sum(r.ok for r in results)
    print(f"summary: {passed}/{len(results)} scenarios passed, {sum(r.landed for r in results)} kills, "
          f"{time.monotonic() - t0:.0f}s")
    if passed == len(results) and not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir kept: {work}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
