"""CPU use of a process tree from /proc (Linux; elsewhere every snapshot is empty), for benchmarks/gpu_memory.py's
sampler: is a server's scheduler CPU-bound, on which core and NUMA node, at what clock?

A snapshot maps each process under a root pid to (kind, CPU time of all its threads in clock ticks, the core its
main thread last ran on, that core's current MHz, its main thread's on-CPU and run-queue-wait ns); `cpu_summary`
turns pairs of timestamped snapshots into rates per process kind. An SGLang scheduler without --sleep-on-idle
polls its sockets in a loop and waits for the GPU in a spin, so its CPU % sits near 100 whether or not its Python
work is the bottleneck: the run-queue wait (runnable, no core free), the cores / NUMA node and the clock say more.
A process that exits, or a file that cannot be read or parsed, is left out (a field it lacks is None).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import statistics


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def parse_stat(text: str) -> tuple[str, int, int, int | None]:
    """/proc/<pid>/stat -> (comm, ppid, utime + stime in clock ticks, core last run on: field 39, None if absent).
    comm (field 2) may hold spaces and parentheses: it runs from the first "(" to the last ")"."""
    head, _, rest = text.rpartition(")")
    comm, f = head.partition("(")[2], rest.split()  # f[n - 3] is field n (1-based, as proc(5) numbers them)
    return comm, int(f[1]), int(f[11]) + int(f[12]), int(f[36]) if len(f) > 36 else None


def parse_cpulist(text: str) -> set[int]:
    """A sysfs cpulist ("0-7,16-23", "5", "") -> its cores."""
    cores = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def cpulist_text(cores) -> str:
    """The inverse of parse_cpulist: {0, 1, 2, 5} -> "0-2,5"."""
    out, cores = [], sorted(cores)
    for c in cores:
        if out and c == out[-1][1] + 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


@functools.lru_cache(maxsize=4)
def numa_node_of_core(node_dir: str = "/sys/devices/system/node") -> dict[int, int]:
    """core -> NUMA node, from `node_dir`/node*/cpulist ({} without it)."""
    out = {}
    for path in glob.glob(os.path.join(node_dir, "node[0-9]*", "cpulist")):
        try:
            node = int(re.search(r"node(\d+)/cpulist$", path).group(1))
            out.update(dict.fromkeys(parse_cpulist(_read(path) or ""), node))
        except (AttributeError, ValueError):  # a name the glob takes and the pattern not ("node1x"), a bad list
            pass
    return out


def core_mhz(core: int | None) -> float | None:
    """The core's current clock in MHz (cpufreq's scaling_cur_freq, kHz), None where cpufreq is absent (VMs)."""
    text = None if core is None else _read(f"/sys/devices/system/cpu/cpu{core}/cpufreq/scaling_cur_freq")
    try:
        return int(text) / 1000 if text else None
    except ValueError:
        return None


def process_kind(cmdline: str, comm: str) -> str:
    """A process's name for the summary: SGLang's setproctitle ("sglang::scheduler_TP0", "sglang::detokenizer"),
    the module of `python -m X` (the launcher, sglang.launch_server, is also the HTTP server and tokenizer
    manager), a multiprocessing helper (resource_tracker, spawn before its setproctitle), else comm."""
    if cmdline.startswith("sglang::"):
        return cmdline.split()[0]
    m = re.search(r"(?:^|\s)-m\s+(\S+)|from multiprocessing\.(\w+)", cmdline)
    return (m.group(1) or m.group(2)) if m else comm


def snapshot(root: int) -> dict[int, tuple]:
    """The processes under `root` (itself included) now: pid -> (kind, CPU ticks of all threads, core of the main
    thread's last run, that core's MHz, main thread on-CPU ns, main thread run-queue wait ns) -- the last two from
    /proc/<pid>/schedstat (None without it). {} when `root` is gone or there is no /proc."""
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    stats, children = {}, {}
    for pid in pids:
        try:
            stats[pid] = parse_stat(_read(f"/proc/{pid}/stat"))
        except (TypeError, ValueError, IndexError):  # gone (None) or unreadable
            continue
        children.setdefault(stats[pid][1], []).append(pid)
    out, todo = {}, [root] if root in stats else []
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        comm, _, ticks, core = stats[pid]
        sched = (_read(f"/proc/{pid}/schedstat") or "").split()[:2]
        ok = len(sched) == 2 and all(map(str.isdigit, sched))
        run_ns, wait_ns = (int(sched[0]), int(sched[1])) if ok else (None, None)
        kind = process_kind((_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip(), comm)
        out[pid] = (kind, ticks, core, core_mhz(core), run_ns, wait_ns)
    return out


def cpu_summary(pairs, hz: float | None = None, numa: dict[int, int] | None = None) -> dict:
    """Per process kind over `pairs` of consecutive ((t, snapshot), (t, snapshot)), t in seconds: `cpu_pct`, CPU
    time of its processes' threads as % of one core (summed over its processes); `main_pct` / `wait_pct`, its main
    threads' on-CPU time / run-queue wait as % of the wall time (None without schedstat); `cores` and `numa_nodes`
    the main threads were seen on (cpulist text), `mhz_median` of those cores' clocks (None without cpufreq),
    `processes`, `seconds` (wall time covered). A pid is counted over a pair where both ends have it; `hz`: clock
    ticks per second (default: SC_CLK_TCK); `numa`: core -> NUMA node (default: this host's, numa_node_of_core)."""
    numa, acc = numa_node_of_core() if numa is None else numa, {}
    for (t0, s0), (t1, s1) in pairs:
        kinds = set()
        for pid, (kind, ticks, core, mhz, run_ns, wait_ns) in s1.items():
            a = acc.setdefault(kind, {"s": 0.0, "ticks": 0, "run": 0, "wait": 0, "sched": True, "pids": set(),
                                      "cores": set(), "mhz": []})
            a["pids"].add(pid)
            if core is not None:
                a["cores"].add(core)
            if mhz is not None:
                a["mhz"].append(mhz)
            before = s0.get(pid)
            if before is None or ticks < before[1]:  # new, or a reused pid
                continue
            kinds.add(kind)
            a["ticks"] += ticks - before[1]
            if None in (run_ns, wait_ns, before[4], before[5]):
                a["sched"] = False
            else:
                a["run"], a["wait"] = a["run"] + run_ns - before[4], a["wait"] + wait_ns - before[5]
        for kind in kinds:
            acc[kind]["s"] += t1 - t0
    if not acc:
        return {}
    hz = hz or os.sysconf("SC_CLK_TCK")
    pct = lambda x, a: round(100 * x / a["s"], 1) if a["s"] > 0 else None  # noqa: E731
    return {kind: {"cpu_pct": pct(a["ticks"] / hz, a), "main_pct": pct(a["run"] / 1e9, a) if a["sched"] else None,
                   "wait_pct": pct(a["wait"] / 1e9, a) if a["sched"] else None,
                   "cores": cpulist_text(a["cores"]),
                   "numa_nodes": cpulist_text({numa[c] for c in a["cores"] if c in numa}),
                   "mhz_median": statistics.median(a["mhz"]) if a["mhz"] else None,
                   "processes": len(a["pids"]), "seconds": round(a["s"], 2)}
            for kind, a in sorted(acc.items())}
