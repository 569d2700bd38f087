"""Issue 26's attack run, round two: try to lose or poison what a user has, and count what held.

    nice -n 10 python scripts/attack_round2.py            # tiny model, ~15 minutes on 2 busy cores
    python scripts/attack_round2.py --only data,resume    # some classes only

Real `python -m align` runs on the tiny model (as scripts/attack_reliability.py builds it), one function per
class: export, adapters, resume, data, permissions, newcomer. Every case the issue names is tried, then the
new ones of scripts/attack_round2_new.py. Each case prints its command's outcome against the expected one;
the end is a markdown table by class (case, expected, held) and, last, one JSON line {class: [tried, held]}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack_round2_cases as cases  # noqa: E402  (scripts beside this one)
import attack_round2_new as new  # noqa: E402
from attack_round2_kit import Ctx, make_runs  # noqa: E402


def main() -> None:
    from align.core.tiny import build_tiny_model

    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma-separated classes (default: all)")
    only = {c for c in p.parse_args().only.split(",") if c}
    tmp = Path(tempfile.mkdtemp(prefix="attack2-"))
    ctx = Ctx(tmp, build_tiny_model(tmp / "tiny", "llama"))
    make_runs(ctx)
    classes = {"export": cases.export, "adapters": cases.adapters, "resume": cases.resume, "data": cases.data,
               "permissions": cases.permissions, "newcomer": cases.newcomer}
    for name, attack in classes.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        attack(ctx)
        new.CASES[name](ctx)
        done = [r for r in ctx.rows if r[0] == name]
        print(f"{name}: {sum(r[3] for r in done)}/{len(done)} held ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| class | case | expected | held |\n|---|---|---|---|")
    for cls, case, expected, held in ctx.rows:
        print(f"| {cls} | {case} | {expected} | {'yes' if held else 'NO'} |")
    shutil.rmtree(tmp, ignore_errors=True)
    table = {}
    for cls, _, _, held in ctx.rows:
        table.setdefault(cls, [0, 0])
        table[cls][0] += 1
        table[cls][1] += held
    print(json.dumps(table))


if __name__ == "__main__":
    main()
