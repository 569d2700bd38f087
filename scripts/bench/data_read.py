"""Reading and validating a big preference file: seconds and peak memory of `load_preferences` (what
`align data check` and the trainers run), in a fresh process so that the peak is the read's own.

    python scripts/bench/data_read.py                    # a ~50 MB JSON array
    python scripts/bench/data_read.py --kind jsonl --mb 50
    python scripts/bench/data_read.py --tree /tmp/old    # the same, with another checkout's align (before/after)

peak_rss_mb is the child's peak resident memory; imports_rss_mb what it held before reading (Python,
torch, align), so peak - imports is what reading cost. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import json, resource, sys, time
from align.data.preference import load_preferences
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
data = load_preferences(sys.argv[1], on_bad_rows="skip")
seconds = time.perf_counter() - t0
print(json.dumps({"rows": len(data.rows), "skipped": len(data.skipped), "seconds": round(seconds, 2),
                  "imports_rss_mb": round(before / 1024, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make_rows(target_bytes: int, seed: int = 0):
    """Preference rows of a few hundred characters each, until about `target_bytes` of JSON."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "answer", "the", "is", "of", "number", "reply", "only"]
    size = 0
    while size < target_bytes:
        text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
        row = {"prompt": text(40), "chosen": text(60), "rejected": text(55)}
        line = json.dumps(row)
        size += len(line) + 2
        yield line


def write_file(path: Path, kind: str, mb: float) -> None:
    with open(path, "w") as f:
        if kind == "jsonl":
            for line in make_rows(int(mb * 1e6)):
                f.write(line + "\n")
        else:
            f.write("[\n")
            for i, line in enumerate(make_rows(int(mb * 1e6))):
                f.write((",\n" if i else "") + line)
            f.write("\n]\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=["json", "jsonl"], default="json")
    ap.add_argument("--mb", type=float, default=50.0, help="file size in MB")
    ap.add_argument("--tree", default=str(REPO), help="checkout whose align package reads the file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prefs.{args.kind}"
        write_file(path, args.kind, args.mb)
        env = {**os.environ, "PYTHONPATH": args.tree}
        done = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                              cwd=args.tree)
        if done.returncode:
            sys.exit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        file_mb = path.stat().st_size / 1e6
    result.update(kind=args.kind, file_mb=round(file_mb, 1), tree=args.tree,
                  read_mb_per_file_mb=round((result["peak_rss_mb"] - result["imports_rss_mb"]) / file_mb, 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
