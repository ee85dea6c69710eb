#!/usr/bin/env python3
"""The peers harness's arithmetic: parse one load run, and turn a run directory into tables.

usage: report.py load wrk|h2load OUTPUT [H2LOAD_LOG]   one run: prints reqs rps bad p50_us p99_us
       report.py rounds RUN_DIR                        results.tsv -> summary.tsv, table.md (printed)
       report.py callgrind RUN_DIR                     callgrind.tsv -> callgrind.md (printed)

RUN_DIR also holds targets.tsv (name, description, in the order asked) and meta.tsv (key, value):
command, machine, versions, date, commit, load, ref, foreign_max.

Why medians of per-round ratios: this VM's CPU speed drifts within seconds, so a target measured
in a slow stretch looks expensive. Each round measures every target back to back, so the ratio
of two targets within a round cancels most of the drift; the median over rounds then drops the
rounds where the drift changed mid-round.
"""

import csv
import math
import re
import statistics
import sys
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# One load run


def to_us(text: str) -> float:
    """wrk's latency '812.00us' / '3.20ms' / '1.05s' in microseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return math.nan
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]


def wrk_stats(out: str) -> tuple:
    reqs = int(re.search(r"^\s*(\d+) requests in", out, re.M).group(1))
    rps = float(re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M).group(1))
    bad = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        bad += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        bad += int(m.group(1))
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)\s*$", out, re.M))
    return reqs, rps, bad, to_us(pct.get("50", "")), to_us(pct.get("99", ""))


def h2load_stats(out: str, log: str | None) -> tuple:
    m = re.search(r"^finished in [\d.]+m?s, ([\d.]+) req/s", out, re.M)
    rps = float(m.group(1))
    m = re.search(r"^requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out, re.M)
    reqs, failed, _errored, timeout = (int(x) for x in m.groups())
    m = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    bad = failed + timeout + sum(int(x) for x in m.groups()[1:])
    p50 = p99 = math.nan
    if log:
        times = sorted(int(row[2]) for row in csv.reader(open(log), delimiter="\t")
                       if len(row) >= 3 and row[1].startswith("2"))
        if times:
            p50 = float(times[len(times) // 2])
            p99 = float(times[min(len(times) - 1, math.ceil(len(times) * 0.99) - 1)])
    return reqs, rps, bad, p50, p99


def cmd_load(tool: str, output: str, log: str | None) -> None:
    out = Path(output).read_text()
    try:
        stats = wrk_stats(out) if tool == "wrk" else h2load_stats(out, log)
    except (AttributeError, ValueError):
        sys.exit(f"report.py: cannot read the {tool} output in {output}:\n{out[-800:]}")
    print("\t".join(fmt(x, 2) if isinstance(x, float) else str(x) for x in stats))


# ------------------------------------------------------------------------------------------------
# Tables


def fmt(x: float, digits: int = 0) -> str:
    return "na" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def group(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:,.0f}"


def num(row: dict, key: str) -> float:
    v = row.get(key, "na")
    return math.nan if v in ("", "na") else float(v)


def median(xs: list) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def read_tsv(path: Path) -> list:
    return list(csv.DictReader(open(path), delimiter="\t"))


def read_pairs(path: Path) -> dict:
    return dict(line.rstrip("\n").split("\t", 1) for line in open(path) if "\t" in line)


def header(meta: dict) -> list:
    return [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['versions']}  ",
        f"Date: {meta['date']}; commit {meta['commit']}",
        "",
    ]


def cmd_rounds(run_dir: Path) -> None:
    meta = read_pairs(run_dir / "meta.tsv")
    targets = read_pairs(run_dir / "targets.tsv")
    ref = meta.get("ref", "A")
    foreign_max = float(meta.get("foreign_max", "10"))
    rows = read_tsv(run_dir / "results.tsv")

    # A (round, target) may have been measured several times because of foreign load; keep the
    # attempt that shared the machine least.
    kept = {}
    for r in rows:
        key = (r["round"], r["target"])
        if key not in kept or num(r, "foreign_pct") < num(kept[key], "foreign_pct"):
            kept[key] = r
    rounds = sorted({int(k[0]) for k in kept})
    cell = {(int(k[0]), k[1]): r for k, r in kept.items()}

    def ratios(t: str) -> list:
        out = []
        for n in rounds:
            if (n, t) in cell and (n, ref) in cell:
                out.append(num(cell[n, t], "sut_cpu_us_per_req") / num(cell[n, ref], "sut_cpu_us_per_req"))
        return out

    summary = []
    for t in targets:
        rs = [cell[n, t] for n in rounds if (n, t) in cell]
        if not rs:
            continue
        col = {k: [num(r, k) for r in rs] for k in rs[0] if k not in ("round", "attempt", "target")}
        rt = ratios(t) if ref in targets else []
        summary.append({
            "target": t,
            "rounds": len(rs),
            "rps": median(col["rps"]),
            "p50_us": median(col["p50_us"]),
            "p99_us": median(col["p99_us"]),
            "cpu_us_per_req": median(col["sut_cpu_us_per_req"]),
            "cpu_spread_pct": 100 * (max(col["sut_cpu_us_per_req"]) - min(col["sut_cpu_us_per_req"]))
            / median(col["sut_cpu_us_per_req"]),
            "cpu_ratio_median": median(rt) if rt else math.nan,
            "cpu_ratio_min": min(rt) if rt else math.nan,
            "cpu_ratio_max": max(rt) if rt else math.nan,
            "syscalls_per_req": median(col["syscalls_per_req"]),
            "kernel_pct": median(col["sut_kernel_pct"]) if "sut_kernel_pct" in col else math.nan,
            "sut_util_pct": median(col["sut_util_pct"]),
            "load_cpu_busy_pct": median(col["load_cpu_busy_pct"]),
            "foreign_pct_median": median(col["foreign_pct"]),
            "foreign_pct_max": max(col["foreign_pct"]),
            "noisy_rounds": sum(1 for x in col["foreign_pct"] if x > foreign_max),
            "errors": int(sum(col["bad"])),
        })

    with open(run_dir / "summary.tsv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        for s in summary:
            w.writerow({k: fmt(v, 3) if isinstance(v, float) else v for k, v in s.items()})

    lat = "p50 / p99 ms" if meta["load"] == "h1" else "p50 / p99 ms (h2load log)"
    lines = header(meta) + [
        f"| target | req/s | CPU µs/req | of it kernel % | CPU ÷ {ref}, median of rounds (range) | syscalls/req "
        f"| {lat} | SUT CPU % | load CPU % | foreign CPU %, median / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        t = s["target"]
        ratio = "–"
        if not math.isnan(s["cpu_ratio_median"]):
            ratio = (f"{s['cpu_ratio_median']:.3f} ({s['cpu_ratio_min']:.2f}–{s['cpu_ratio_max']:.2f})"
                     if t != ref else "1")
        latency = f"{fmt(s['p50_us'] / 1000, 2)} / {fmt(s['p99_us'] / 1000, 2)}"
        name = f"**{t}: {targets[t]}**" if t in ("G", "G0") else f"{t}: {targets[t]}"
        lines.append(
            f"| {name} | {group(s['rps'])} | {fmt(s['cpu_us_per_req'], 2)} | {fmt(s['kernel_pct'])} | {ratio} | "
            f"{fmt(s['syscalls_per_req'], 2)} | {latency} | {fmt(s['sut_util_pct'])} | "
            f"{fmt(s['load_cpu_busy_pct'])} | {fmt(s['foreign_pct_median'])} / {fmt(s['foreign_pct_max'])} |")
    lines.append("")
    # The per-round ratios, so a reader sees the spread the median hides.
    if ref in targets:
        lines.append(f"CPU µs/req ÷ {ref}, per round (order alternates each round):")
        lines.append("")
        lines.append("| round | " + " | ".join(targets) + " |")
        lines.append("|---" * (len(targets) + 1) + "|")
        for n in rounds:
            cells = []
            for t in targets:
                if (n, t) in cell and (n, ref) in cell:
                    v = num(cell[n, t], "sut_cpu_us_per_req") / num(cell[n, ref], "sut_cpu_us_per_req")
                    noisy = num(cell[n, t], "foreign_pct") > foreign_max
                    cells.append(f"{v:.3f}{'*' if noisy else ''}")
                else:
                    cells.append("–")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    noisy = sum(s["noisy_rounds"] for s in summary)
    # Every attempt counts here, kept or not: a failed request means a target misbehaved.
    failed = [r for r in rows if num(r, "bad") > 0]
    lines.append(
        f"Medians over {len(rounds)} round(s). SUT CPU % and load CPU %: of one core (the server "
        "under test's process tree; the load CPU's busy time). Foreign CPU: used by processes "
        f"outside the harness during the run, % of one core; {noisy} measurement(s) stayed above "
        f"{foreign_max:.0f} % after retries{' (marked *)' if noisy else ''}.")
    if failed:
        where = ", ".join(f"{r['bad']} in {r['target']} round {r['round']} try {r['attempt']}" for r in failed)
        lines.append(f"**Requests failed (non-2xx, socket errors or timeouts): {where}. "
                     "These figures are not valid.**")
    text = "\n".join(lines) + "\n"
    (run_dir / "table.md").write_text(text)
    print(text, end="")


def cmd_callgrind(run_dir: Path) -> None:
    meta = read_pairs(run_dir / "meta.tsv")
    targets = read_pairs(run_dir / "targets.tsv")
    ref = meta.get("ref", "A")
    rows = {r["target"]: r for r in read_tsv(run_dir / "callgrind.tsv")}
    ref_ir = num(rows[ref], "ir_per_req") if ref in rows else math.nan
    lines = header(meta) + [
        f"| target | instructions/req | ÷ {ref} |",
        "|---|---|---|",
    ]
    for t in targets:
        if t not in rows:
            continue
        ir = num(rows[t], "ir_per_req")
        name = f"**{t}: {targets[t]}**" if t in ("G", "G0") else f"{t}: {targets[t]}"
        lines.append(f"| {name} | {group(ir)} | {fmt(ir / ref_ir, 3)} |")
    lines += ["", f"Instructions per request = (Ir after N2 requests − Ir after N1) / (N2 − N1), "
              f"N1={meta['n1']}, N2={meta['n2']}: start-up, handshakes and connection setup cancel."]
    text = "\n".join(lines) + "\n"
    (run_dir / "callgrind.md").write_text(text)
    print(text, end="")


def main() -> None:
    args = sys.argv[1:]
    if len(args) in (3, 4) and args[0] == "load" and args[1] in ("wrk", "h2load"):
        cmd_load(args[1], args[2], args[3] if len(args) == 4 else None)
    elif len(args) == 2 and args[0] == "rounds":
        cmd_rounds(Path(args[1]))
    elif len(args) == 2 and args[0] == "callgrind":
        cmd_callgrind(Path(args[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
