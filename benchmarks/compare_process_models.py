"""Process-per-GPU against single-process: per op, the ratio of the two JSONs' times.

    python benchmarks/compare_process_models.py single.json multi.json [--tol 0.05] [--json out]

Both files come from the same benchmark (``bench_normal.py`` or ``bench_ll.py``) with the same
shapes; the second was run one process per GPU (``launch_local.py``). Rows are matched on op,
T, backend (and E, routing, num_sms for normal mode); for each, process/single of the
host-chained time ``us`` (and of the profiler's device ``span_us`` where both have one). A
ratio within 1 + tol is "ok", else "MISSED" (issue 22: tol = 5%). Exit 1 only if no row
matches; a missed target is reported, not an error. Different R in the two files (the one-GPU
smoke: R=1 against 2 processes sharing GPU 0) is said so: the ratios then check the plumbing
only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

KEYS = ("op", "tokens", "backend", "experts", "routing", "num_sms")


def key(row):
    return tuple(row.get(k) for k in KEYS)


def compare(single, multi, tol):
    s_rows = {key(r): r for r in single["results"]}
    out = []
    for r in multi["results"]:
        s = s_rows.get(key(r))
        if s is None:
            continue
        item = dict(zip(KEYS, key(r)), single_us=s["us"], multi_us=r["us"],
                    ratio=r["us"] / s["us"] if s["us"] > 0 else math.nan)
        for k in ("span_us",):
            a, b = s.get(k), r.get(k)
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a > 0:
                item[f"single_{k}"], item[f"multi_{k}"], item[f"ratio_{k}"] = a, b, b / a
        # a non-positive time is noise (a difference of two wall times, e.g. on CPU)
        item["ok"] = (bool(item["ratio"] <= 1 + tol) if s["us"] > 0 and r["us"] > 0 else None)
        out.append(item)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("single")
    p.add_argument("multi")
    p.add_argument("--tol", type=float, default=0.05)
    p.add_argument("--json", default=None, help="write the comparison here")
    a = p.parse_args(argv)
    with open(a.single) as f:
        single = json.load(f)
    with open(a.multi) as f:
        multi = json.load(f)
    es, em = single["environment"], multi["environment"]
    rows = compare(single, multi, a.tol)
    print(f"\nprocess-per-GPU ({a.multi}: R={em['ranks']}, {em.get('processes', 1)} processes) "
          f"against single-process ({a.single}: R={es['ranks']}, {es.get('processes', 1)} "
          f"process), {es['device']}; host-chained us per call; target process/single <= "
          f"{1 + a.tol:.2f}")
    if es["ranks"] != em["ranks"]:
        print(f"NOTE: different R ({es['ranks']} vs {em['ranks']}): not a comparison of process "
              f"models, a check of the plumbing only")
    fmt = "{:26s} {:>5} {:>4} {:7s} {:7s} {:>10} {:>10} {:>8} {:>8} {:6s}"
    print(fmt.format("op", "T", "E", "routing", "backend", "single", "process", "ratio",
                     "span r.", "target"))
    for r in rows:
        span = f"{r['ratio_span_us']:.3f}" if "ratio_span_us" in r else ""
        print(fmt.format(r["op"], r["tokens"], r["experts"] or "", r["routing"] or "",
                         r["backend"], f"{r['single_us']:.1f}", f"{r['multi_us']:.1f}",
                         f"{r['ratio']:.3f}", span,
                         {True: "ok", False: "MISSED", None: "noise"}[r["ok"]]))
    missing = sorted({key(r)[:3] for r in multi["results"]} - {(r["op"], r["tokens"], r["backend"])
                                                               for r in rows})
    if missing:
        print(f"only in {a.multi}: {missing}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(single=a.single, multi=a.multi, tol=a.tol, single_env=es,
                           multi_env=em, rows=rows,
                           all_ok=bool(rows) and all(r["ok"] is True for r in rows)), f, indent=1)
    if not rows:
        print("no row of the two files matches")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
