"""Many generated QEMU scenarios, judged by the DMA log (issue 11): agreement per class.

    .venv/bin/python -m bench.scenarios --runs 200 --qemu all --jobs 2 --seed 1
    .venv/bin/python -m bench.scenarios --replay bench/results/failures-....json
    .venv/bin/python -m bench.scenarios --runs 60 --viommu amd --jobs 1 --seed 4242
    .venv/bin/python -m bench.scenarios --runs 60 --arch aarch64 --jobs 1 --seed 4242

Generates --runs scenarios from --seed (hypothesis, reproducible), runs each on every
selected QEMU build of the test matrix with the VFIO emulation, and prints one markdown
table per QEMU version: for each scenario class, runs, rejected (QEMU refused the
generated line: the generator's mistake, never agreement), agreement, the disagreement
classes and the unverified rate. Failing scenarios (argv, scenario model, seed) are
written to bench/results/ for --replay.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import QEMU_ARM_MATRIX, QEMU_MATRIX
from tests.generator.model import AmdMode, QemuBinary, Scenario
from tests.generator.oracle import CLASSES, evaluate, refused_behind_viommu, summary
from tests.generator.runner import Built, accepts_unusual_ids, amd_mode, qemu_version
from tests.generator.strategies import arm_scenarios, scenarios

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(tempfile.gettempdir()) / "qmpguard-bench-fakevfio"


def generate(
    n: int,
    seed_value: int,
    unusual_ids: bool = True,
    amd: AmdMode | None = None,
    only: tuple[str, ...] = (),
    strategy: st.SearchStrategy[Scenario] | None = None,
) -> list[Scenario]:
    """The first n distinct scenarios hypothesis draws from `seed_value` (same seed, same
    list); amd and only as in strategies.scenarios, or another `strategy`."""
    out: dict[str, Scenario] = {}

    @seed(seed_value)
    @settings(
        max_examples=4 * n,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(scenarios(unusual_ids, amd, only) if strategy is None else strategy)
    def collect(s: Scenario) -> None:
        if len(out) < n:
            out.setdefault(repr(s), s)

    collect()
    return list(out.values())[:n]


def _quiet() -> None:
    """qmpguard logs each failed target at info on stdout: keep the tables readable."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _one(job: tuple[int, dict[str, Any], str, str]) -> tuple[int, str, dict[str, Any]]:
    _quiet()
    index, scn_json, label, qemu_path = job
    scn = Scenario.from_json(scn_json)
    built = Built.build(CACHE)
    work = Path(tempfile.mkdtemp(prefix=f"qg-scn-{label}-{index}-"))
    try:
        started = time.monotonic()
        out = evaluate(scn, QemuBinary.resolve(qemu_path), work, built)
        rec = summary(out)
        # QEMU's own rule (vfio after an amd-iommu that cannot notify it): a rejection
        # the generator means to make, not its mistake
        rec["refused_by_rule"] = out.run is not None and refused_behind_viommu(scn, out.run)
        rec["wall"] = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec["classes"] = scn.classes()
    rec["scenario"] = scn_json
    rec["vfio"] = len(rec["devices"])
    rec["unverified"] = sum(1 for d in rec["devices"] if d["verdict"] == "unverified")
    return index, label, rec


def table(label: str, version: str, recs: list[dict[str, Any]]) -> str:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        rows["all"].append(r)
        for c in r["classes"]:
            rows[c].append(r)
    head = [
        "class",
        "runs",
        "rejected",
        "harness",
        "agreement",
        *CLASSES,
        "unverified rate",
    ]
    lines = [
        f"### QEMU {version} ({label})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in ["all", *sorted(k for k in rows if k != "all")]:
        rs = rows[name]
        status = Counter(r["status"] for r in rs)
        judged = status["agree"] + status["disagree"]
        per_class = Counter(c for r in rs for c in {d["class"] for d in r["disagreements"]})
        vfio = sum(r["vfio"] for r in rs if r["status"] in ("agree", "disagree"))
        unv = sum(r["unverified"] for r in rs if r["status"] in ("agree", "disagree"))
        agreement = f"{status['agree']}/{judged}" + (
            f" ({100 * status['agree'] / judged:.1f}%)" if judged else ""
        )
        cells = [
            name,
            str(len(rs)),
            str(status["rejected"]),
            str(status["harness-error"]),
            agreement,
            *(str(per_class[c]) for c in CLASSES),
            f"{100 * unv / vfio:.1f}%" if vfio else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def version_text(path: str) -> str:
    import subprocess

    qb = QemuBinary.resolve(path)
    out = subprocess.run(
        [qb.path, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return out[3] if len(out) > 3 else "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenarios", description=__doc__)
    p.add_argument("--runs", type=int, default=50, help="scenarios per QEMU version")
    p.add_argument("--qemu", default="all", help=f"a label of {list(QEMU_MATRIX)} or 'all'")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--viommu",
        default="",
        help="comma-separated vIOMMU models to generate (intel, virtio, amd, none); "
        "default: every kind, managers' shapes included",
    )
    p.add_argument("--replay", type=Path, help="re-run the scenarios of a results file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--keep-all", action="store_true", help="write every run's record, not only failures"
    )
    p.add_argument(
        "--arch",
        choices=["x86_64", "aarch64"],
        default="x86_64",
        help="aarch64: the ARM matrix, virt with virtio-iommu-pci or arm-smmuv3 (10.2+)",
    )
    args = p.parse_args(argv)
    _quiet()
    matrix = QEMU_ARM_MATRIX if args.arch == "aarch64" else QEMU_MATRIX
    labels = list(matrix) if args.qemu == "all" else [args.qemu]
    unknown = [lb for lb in labels if lb not in matrix]
    if unknown:
        p.error(f"unknown QEMU label(s) {unknown}; known: {list(matrix)}")
    Built.build(CACHE)
    jobs: list[tuple[int, dict[str, Any], str, str]] = []
    if args.replay:
        data = json.loads(args.replay.read_text())
        replay = [Scenario.from_json(f["scenario"]) for f in data["failures"]]
        seed_value = data.get("seed")
        for label in labels:
            jobs += [(i, s.to_json(), label, matrix[label]) for i, s in enumerate(replay)]
    else:
        seed_value = args.seed
        only = tuple(m for m in args.viommu.split(",") if m)
        lists: dict[tuple[bool, AmdMode], list[Scenario]] = {}
        arm: dict[bool, list[Scenario]] = {}
        for label in labels:
            qemu = QemuBinary.resolve(matrix[label])
            if args.arch == "aarch64":
                smmu = qemu_version(qemu) >= (10, 2)  # -device arm-smmuv3
                if smmu not in arm:
                    strategy = arm_scenarios(smmu=smmu)
                    arm[smmu] = generate(args.runs, args.seed, strategy=strategy)
                jobs += [(i, s.to_json(), label, matrix[label]) for i, s in enumerate(arm[smmu])]
                continue
            # builds that refuse ids outside id_wellformed() get none (not our mistake
            # twice); amd-iommu as each build supports it (runner.amd_mode)
            key = (accepts_unusual_ids(qemu), amd_mode(qemu))
            if key not in lists:
                t0 = time.monotonic()
                lists[key] = generate(args.runs, args.seed, key[0], key[1], only)
                print(
                    f"generated {len(lists[key])} scenarios (unusual ids: {key[0]}, "
                    f"amd-iommu: {key[1].value}) in {time.monotonic() - t0:.1f}s",
                    file=sys.stderr,
                )
            jobs += [(i, s.to_json(), label, matrix[label]) for i, s in enumerate(lists[key])]
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for done, (index, label, rec) in enumerate(pool.map(_one, jobs), 1):
            rec["index"] = index
            results[label].append(rec)
            if rec["status"] in ("disagree", "harness-error"):
                what = [d["class"] for d in rec["disagreements"]] or [rec["detail"][:120]]
                print(f"[{label} #{index}] {rec['status']}: {what}", file=sys.stderr)
            if done % 25 == 0:
                print(f"{done}/{len(jobs)} done", file=sys.stderr)
    wall = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tables = []
    for label in labels:
        recs = sorted(results[label], key=lambda r: r["index"])
        tables.append(table(label, version_text(matrix[label]), recs))
        print()
        print(tables[-1])
        secs = [r["wall"] for r in recs]
        print(
            f"\n{len(recs)} scenarios, {sum(secs) / max(1, len(secs)):.2f}s each "
            f"(reference runs included)"
        )
        failures = [r for r in recs if r["status"] in ("disagree", "harness-error")]
        rejected = [r for r in recs if r["status"] == "rejected"]
        out = args.out / f"failures-{label}-seed{seed_value}-{stamp}.json"
        out.write_text(
            json.dumps(
                {
                    "qemu": label,
                    "seed": seed_value,
                    "runs": len(recs),
                    "failures": failures,
                    "rejected": rejected,
                    **({"all": recs} if args.keep_all else {}),
                },
                indent=1,
            )
        )
        by_rule = sum(1 for r in rejected if r.get("refused_by_rule"))
        print(
            f"failing scenarios: {out} ({len(failures)}; rejected {len(rejected)}, "
            f"{by_rule} of them QEMU's refusal of vfio after its vIOMMU)"
        )
        for line, n in Counter(r["detail"][:160] for r in rejected).most_common(5):
            print(f"  rejected x{n}: {line}")
    summary = args.out / f"summary-seed{seed_value}-{stamp}.md"
    summary.write_text("\n\n".join(tables) + "\n")
    print(f"\nwall time {wall:.0f}s with {args.jobs} jobs; tables in {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
