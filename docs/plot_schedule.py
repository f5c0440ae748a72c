"""Draws docs/schedule.svg from the `kfrtrl train --json` reports in docs/runs/schedule/:
one stream of Tiny Shakespeare, running BPC and the growth rate of the exact state Jacobians
against bytes, for TBPTT-25 and the OK update schedules of docs/RESULTS.md §4 (session 15).

    python3 docs/plot_schedule.py   # needs matplotlib
"""
import json
import pathlib

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = pathlib.Path(__file__).parent
RUNS = [
    ("one_tbptt25.json", "tbptt:25, 10^-2.5"),
    ("one_defaults.json", "ok:8, the defaults (32 tokens per update from 8)"),
    ("one_k16_from8.json", "ok:8, 16 tokens per update from 8"),
    ("one_k16_from1_r256.json", "ok:8, 16 tokens per update from 1 (ramp 256)"),
    ("one_k16.json", "ok:8, 16 tokens per update from the start (300k)"),
]


def main():
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for name, label in RUNS:
        path = HERE / "runs" / "schedule" / name
        report = json.loads(path.read_text().strip().splitlines()[-1])
        trace = report["trace"]
        x = [t["symbols"] / 1e3 for t in trace]
        top.plot(x, [t["recent_bpc"] for t in trace], marker=".", label=f"{label}: {report['train_bpc']:.3f}")
        bottom.plot(x, [t["tangent_growth_mean"] for t in trace], marker=".", label=label)
    top.set_ylabel("running BPC (last ~1,000 bytes)")
    top.set_title("One stream, Tiny Shakespeare, RHN n = 128 (legend: prequential BPC)")
    top.legend(fontsize=8)
    bottom.set_ylabel("growth rate of the exact Jacobians")
    bottom.set_xlabel("bytes (thousands)")
    bottom.axhline(0.0, color="gray", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(HERE / "schedule.svg")


if __name__ == "__main__":
    main()
