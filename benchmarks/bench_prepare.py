"""Memory and speed of streaming `lmprune prepare`, measured side by side in one run.

Generates two JSONL corpora of varied synthetic text (~100 MB and ~400 MB by default), trains a BPE
tokenizer on 2 MB of it (so no `prepare` below trains one), then measures:

- a bare `tokenizers` loop: `encode_batch` (single-threaded, TOKENIZERS_PARALLELISM=false) over the
  small corpus's texts, already in memory, in batches of ~1 MiB of text, reading each encoding's ids;
- `lmprune prepare --num-proc 1` and `--num-proc 2` on each corpus, each as its own process (wall time
  includes interpreter start and imports, also measured alone on a 10-document corpus); peak memory
  is the largest sum of RSS over the process tree (main + workers), sampled every 0.2 s.

Goals (printed as ratios): peak RSS <= 1 GB; RSS(large) / RSS(small) <= 1.2 (memory does not grow
with the corpus); prepare --num-proc 1 tokens/s >= 0.9 x the bare loop; --num-proc 2 >= 1.7 x one
process (on the large corpus, where the fixed start-up of a process weighs least; the small
corpus's ratio is printed beside it). It also checks that the shards of --num-proc 1 and 2 are byte-identical.

    PYTHONPATH=src python benchmarks/bench_prepare.py --work /tmp/bench_prepare [--small-mb 100 --large-mb 400]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil


def synthetic_vocabulary(rng: random.Random, size: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, 0.8, 0.2, 0.2,
               0.1, 0.1]
    words = {"".join(rng.choices(letters, weights, k=rng.randint(1, 11))) for _ in range(size)}
    accents = ["é", "ü", "ñ", "ø", "ß", "ç", "å"]
    extra = [w[:2] + rng.choice(accents) + w[2:] for w in list(words)[: size // 50]]
    return sorted(words) + extra + [str(n) for n in range(1000)]


def write_corpus(path: Path, megabytes: int, seed: int) -> int:
    """A JSONL file of ~megabytes MB: documents of Zipf-distributed words with punctuation and line
    breaks, 200 B to 20 KB each. Returns the number of documents."""
    rng = random.Random(seed)
    vocabulary = synthetic_vocabulary(random.Random(0), 40_000)  # one vocabulary for every corpus
    cumulative, total = [], 0.0
    for rank in range(len(vocabulary)):
        total += 1.0 / (rank + 1) ** 1.05
        cumulative.append(total)
    target, written, documents = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            n_words = int(10 ** rng.uniform(1.6, 3.6))
            words = rng.choices(vocabulary, cum_weights=cumulative, k=n_words)
            for i in range(0, n_words, rng.randint(6, 18)):
                words[i] = words[i].capitalize()
            sentences = [" ".join(words[i : i + 14]) + rng.choice(".,;!?:") for i in range(0, n_words, 14)]
            text = "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5))
            line = json.dumps({"text": text, "id": documents}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
    return documents


def make_tokenizer(corpus: Path, out: Path) -> None:
    from lmprune.data import train_bpe_tokenizer

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size > 2_000_000:
                break
    train_bpe_tokenizer(texts, 8192).save_pretrained(out)


def bare_loop(corpus: Path, tokenizer_dir: Path) -> tuple[float, int]:
    """(seconds, tokens) of encode_batch over the corpus's texts, loaded beforehand."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    with open(corpus, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    batches, batch, size = [], [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    tokens = 0
    start = time.perf_counter()
    for batch in batches:
        tokens += sum(len(encoding.ids) for encoding in tokenizer.encode_batch(batch, add_special_tokens=False))
    return time.perf_counter() - start, tokens


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_prepare(corpus: Path, tokenizer_dir: Path, out: Path, num_proc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lmprune", "prepare", "--source", str(corpus), "--out", str(out),
               "--tokenizer", str(tokenizer_dir), "--num-proc", str(num_proc), "--quiet"]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(watched))
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"prepare exited with {child.returncode}")
    meta = json.loads((out / "meta.json").read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"] - sum(meta["documents"].values())  # EOS not counted
    return {"seconds": seconds, "tokens": tokens, "peak_rss": peak, "meta": meta}


def same_shards(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.bin"))
    return files == sorted(p.name for p in b.glob("*.bin")) and all(
        filecmp.cmp(a / name, b / name, shallow=False) for name in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_prepare"))
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--large-mb", type=int, default=400)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    small, large = args.work / f"small-{args.small_mb}mb.jsonl", args.work / f"large-{args.large_mb}mb.jsonl"
    for path, size, seed in ((small, args.small_mb, 1), (large, args.large_mb, 2)):
        if not path.is_file():
            print(f"writing {path.name}: {write_corpus(path, size, seed):,} documents", flush=True)
    tokenizer_dir = args.work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        make_tokenizer(small, tokenizer_dir)

    bare_seconds, bare_tokens = bare_loop(small, tokenizer_dir)
    print(f"bare encode_batch loop: {bare_tokens:,} tokens in {bare_seconds:.1f} s = {bare_tokens / bare_seconds:,.0f} tok/s",
          flush=True)
    runs = {}
    startup = args.work / "startup.jsonl"  # a 10-document corpus: the fixed cost of a prepare process
    with open(small, encoding="utf-8") as source, open(startup, "w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(10), source))
    for name, corpus, num_proc in (("startup-1", startup, 1), ("small-1", small, 1), ("small-2", small, 2),
                                   ("large-1", large, 1), ("large-2", large, 2)):
        runs[name] = run_prepare(corpus, tokenizer_dir, args.work / f"out-{name}", num_proc)
        r = runs[name]
        print(f"prepare {corpus.name} --num-proc {num_proc}: {r['tokens']:,} tokens in {r['seconds']:.1f} s = "
              f"{r['tokens'] / r['seconds']:,.0f} tok/s, peak RSS {r['peak_rss'] / 2**20:,.0f} MiB, "
              f"{len(r['meta']['shards']['train'])} train shards", flush=True)
    assert runs["small-1"]["tokens"] == bare_tokens, "prepare and the bare loop must encode the same tokens"
    rate = {name: r["tokens"] / r["seconds"] for name, r in runs.items()}
    peak = max(r["peak_rss"] for r in runs.values())
    print(f"peak RSS over all runs: {peak / 2**30:.2f} GiB (goal <= 1 GB)")
    print(f"RSS({args.large_mb} MB) / RSS({args.small_mb} MB), --num-proc 2: "
          f"{runs['large-2']['peak_rss'] / runs['small-2']['peak_rss']:.3f} (goal <= 1.2)")
    print(f"prepare --num-proc 1 / bare loop tokens/s: {rate['small-1'] / (bare_tokens / bare_seconds):.3f} (goal >= 0.9)")
    print(f"startup of one prepare process (imports, tokenizer, a 10-document corpus): "
          f"{runs['startup-1']['seconds']:.1f} s")
    print(f"prepare --num-proc 2 / --num-proc 1 tokens/s, {args.small_mb} MB: {rate['small-2'] / rate['small-1']:.3f}")
    print(f"prepare --num-proc 2 / --num-proc 1 tokens/s, {args.large_mb} MB: {rate['large-2'] / rate['large-1']:.3f} "
          f"(goal >= 1.7)")
    print(f"shards of --num-proc 1 and 2 byte-identical: {same_shards(args.work / 'out-small-1', args.work / 'out-small-2')}")
    print(f"CPU cores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
