"""The benchmark's figures against the performance goals, and their display."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fleet.cli.bench.measure import Figures


def roundtrip_figures(rows: list[Figures]) -> dict[str, Any]:
    by = {r.key: r for r in rows}
    a, b, c, d, e = (by[k].p(0.5) for k in "abcde")
    return {"roundtrip": {r.key: r.as_dict() for r in rows},
            "ratios": {"d_p50_over_a": d / a, "d_p50_over_b": d / b, "c_p50_over_d": c / d,
                       "e_p50_over_d": e / d}}


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance issue's goals, for the parts that ran."""
    rows = []

    def goal(what: str, now: str, met: bool) -> None:
        rows.append({"goal": what, "now": now, "met": met})

    if "ratios" in report:
        r = report["ratios"]
        goal("channel p50 ≤ 1.5 x (a) and ≤ 1.25 x (b)",
             f"{r['d_p50_over_a']:.2f} x (a), {r['d_p50_over_b']:.2f} x (b)",
             r["d_p50_over_a"] <= 1.5 and r["d_p50_over_b"] <= 1.25)
        goal("channel ≥ 10 x faster than exec per task", f"{r['c_p50_over_d']:.1f} x",
             r["c_p50_over_d"] >= 10)
    if "throughput" in report:
        t = report["throughput"]
        goal("3 agents x 2 slots ≥ 50 % of bare Celery with 6 slots",
             f"{t['ratio_vs_cat']:.0%} of bare Celery running cat ({t['ratio_vs_noop']:.0%} of the no-op)",
             t["ratio_vs_cat"] >= 0.5)
    if "cold" in report:
        worst = max(report["cold"]["cold_start_ms"]) / 1000
        goal("cold start ≤ 1 s", f"{worst:.2f} s (worst of 3)", worst <= 1)
        idle = report["cold"]["idle_container_mib"]
        goal("idle agent container ≤ 16 MiB", f"{idle:.1f} MiB", idle <= 16)
    if "hundred" in report:
        h = report["hundred"]
        goal(f"{h['agents']} agent containers up in ≤ 60 s",
             f"{h['containers_running_s']:.0f} s to all running, "
             f"{h['first_tasks_done_s']:.0f} s until each answered a task", h["first_tasks_done_s"] <= 60)
    if "cli" in report:
        c = report["cli"]
        goal("`fleet --help` and `fleet status` start in ≤ 0.2 s",
             f"{c['help_ms'] / 1000:.2f} s / {c['status_ms'] / 1000:.2f} s "
             f"(python alone {c['python_ms'] / 1000:.2f} s)",
             max(c["help_ms"], c["status_ms"]) <= 200)
    if "metrics" in report:
        m = report["metrics"]
        goal(f"a /metrics scrape with {m['tasks']:,} tasks in Redis < 100 ms",
             f"{m['p50_ms']:.1f} ms p50, {m['p95_ms']:.1f} ms p95 ({m['ratio']:.2f} x an empty fleet's)",
             m["p95_ms"] < 100)
    return rows


def print_report(report: dict[str, Any], console: Console) -> None:
    if "roundtrip" in report:
        rows = report["roundtrip"]
        base = rows["a"]
        table = Table(title=f"round trip of a trivial task ({report['tasks']} tasks, one Redis)")
        for column in ("path", "slots", "p50 ms", "p95 ms", "tasks/s", "p50 x (a)", "tasks/s vs (a)"):
            table.add_column(column, justify="left" if column == "path" else "right")
        for key, row in rows.items():
            table.add_row(f"({key}) {row['name']}", str(row["slots"]), f"{row['p50_ms']:.1f}",
                          f"{row['p95_ms']:.1f}", f"{row['tasks_per_s']:.1f}",
                          f"{row['p50_ms'] / base['p50_ms']:.2f}",
                          f"{row['tasks_per_s'] / base['tasks_per_s']:.2f}")
        console.print(table)
        r = report["ratios"]
        console.print(f"channel p50 = {r['d_p50_over_a']:.2f} x (a) = {r['d_p50_over_b']:.2f} x (b); "
                      f"exec per task = {r['c_p50_over_d']:.1f} x the channel; "
                      f"docker run = {r['e_p50_over_d']:.1f} x the channel")
    if "cold" in report:
        cold = report["cold"]
        console.print(f"cold start (no container → result): "
                      f"{', '.join(f'{t:.0f} ms' for t in cold['cold_start_ms'])}")
        console.print(f"idle agent container (init + sleep + supervisor): "
                      f"{cold['idle_container_mib']:.1f} MiB")
    if "throughput" in report:
        t = report["throughput"]
        table = Table(title=f"throughput, {t['tasks']} tasks submitted at once (median of 3)")
        for column in ("", "tasks/s", "fleet 3x2 / this"):
            table.add_column(column, justify="right" if column else "left")
        table.add_row("fleet, 3 agents x 2 slots, cat in the containers",
                      f"{t['fleet_3x2_tasks_per_s']:.1f}", "")
        table.add_row("bare Celery, 6 slots, cat as a host subprocess",
                      f"{t['bare6_cat_tasks_per_s']:.1f}", f"{t['ratio_vs_cat']:.0%}")
        table.add_row("bare Celery, 6 slots, no-op", f"{t['bare6_noop_tasks_per_s']:.1f}",
                      f"{t['ratio_vs_noop']:.0%}")
        console.print(table)
    if "hundred" in report:
        h = report["hundred"]
        table = Table(title=f"{h['agents']} agents (concurrency 1) on this host, one `fleet worker`")
        table.add_column("")
        table.add_column("", justify="right")
        table.add_row("all containers running", f"{h['containers_running_s']:.1f} s")
        table.add_row("every agent answered its first task", f"{h['first_tasks_done_s']:.1f} s")
        table.add_row("containers' memory (sum / mean)",
                      f"{h['containers_mib']:.0f} / {h['container_mean_mib']:.1f} MiB")
        table.add_row(f"worker processes ({h['worker_processes']}): RSS / PSS",
                      f"{h['worker_rss_mib']:.0f} / {h['worker_pss_mib']:.0f} MiB")
        table.add_row(f"containerd shims ({h['shim_processes']}): RSS / PSS",
                      f"{h['shims_rss_mib']:.0f} / {h['shims_pss_mib']:.0f} MiB")
        console.print(table)
    if "cli" in report:
        c = report["cli"]
        console.print(f"command line start-up (median of {c['runs']}): `fleet --help` {c['help_ms']:.0f} ms, "
                      f"`fleet status ID` {c['status_ms']:.0f} ms; `python -c pass` {c['python_ms']:.0f} ms")
    if "egress" in report:
        e = report["egress"]
        table = Table(title=f"an HTTPS request of {e['body_bytes']} bytes, {e['requests']} each way")
        for column in ("", "new connection p50 ms", "kept-alive p50 ms", "requests/s (4 connections)"):
            table.add_column(column, justify="right" if column else "left")
        for name, row in (("directly", e["direct"]), ("through fleet's egress proxy", e["proxy"])):
            table.add_row(name, f"{row['fresh_p50_ms']:.1f}", f"{row['kept_p50_ms']:.1f}",
                          f"{row['requests_per_s']:.0f}")
        table.add_row("proxy / direct", f"{e['fresh_ratio']:.2f} x", f"{e['kept_ratio']:.2f} x",
                      f"{e['rate_ratio']:.2f} x")
        console.print(table)
    if "real-agent" in report:
        r = report["real-agent"]
        table = Table(title=f"clone, commit, push: {r['tasks']} tasks each, one at a time "
                            f"({r['image']}, {r['image_mb']:.0f} MB)")
        for column in ("", "submit → push p50 ms", "max ms", "submit → succeeded p50 ms", "largest RSS"):
            table.add_column(column, justify="right" if column else "left")
        for name, row in (("Claude Code (stand-in model)", r["claude_code"]), ("git alone", r["git_alone"])):
            memory = f"{row['max_rss_mb']} MB" if "max_rss_mb" in row else ""
            table.add_row(name, f"{row['push_p50_ms']:.0f}", f"{row['push_max_ms']:.0f}",
                          f"{row['done_p50_ms']:.0f}", memory)
        table.add_row("Claude Code / git alone", f"{r['push_ratio']:.1f} x", "", "", "")
        console.print(table)
    if "metrics" in report:
        m = report["metrics"]
        console.print(f"/metrics ({m['bytes']:,} bytes), {m['scrapes']} scrapes: {m['p50_ms']:.1f} ms p50, "
                      f"{m['p95_ms']:.1f} ms p95 with {m['tasks']:,} tasks; {m['empty_p50_ms']:.1f} ms p50 "
                      "with none")
    table = Table(title="goals")
    for column in ("goal", "now", "met"):
        table.add_column(column)
    for row in report["goals"]:
        table.add_row(row["goal"], row["now"], "[green]met[/]" if row["met"] else "[red]not met[/]")
    console.print(table)
