"""scripts/tables.sh: the jobs that re-run every checkpoint-dependent table of toy/RESULTS.md (issue 20's "re-adopt
the checkpoint only with all tables re-run"). Checked without running them (TABLES_DRY=1): the halves of each split
cover its items once, the rows are those of the committed results, and the quality runs are there."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from toy import scenes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tables.sh"
WEIGHTS = ROOT / "toy" / "weights" / "toy_sd15.safetensors"


def _jobs(tmp_path: Path, env_extra: dict | None = None) -> list[list[str]]:
    import os

    env = dict(os.environ, TABLES_DRY="1", **(env_extra or {}))
    out = subprocess.run(["bash", str(SCRIPT), str(WEIGHTS), str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "out" / "parts").glob("job_*.sh"))
    assert files and out.stdout.count("\n") == len(files)
    return [shlex.split(f.read_text().split(" > ")[0]) for f in files]


def _opt(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_jobs_cover_every_split_item_once_with_the_committed_rows(tmp_path):
    import importlib

    from toy import benchmark as bench_mod

    for m in bench_mod.METHOD_MODULES:  # the rows register themselves on import
        importlib.import_module(m)
    jobs = _jobs(tmp_path)
    bench = [j for j in jobs if "toy.benchmark" in j]
    for split in ("test", "dev"):
        committed = list(json.loads((ROOT / "toy" / "results" / f"{split}_split.json").read_text()))
        names = [s.name for s in scenes.split_set(split, 2)]
        runs = [j for j in bench if _opt(j, "--split") == split]
        by_rows: dict[str, list[str]] = {}
        for j in runs:
            assert _opt(j, "--frames") == "4" and _opt(j, "--weights") == str(WEIGHTS)
            by_rows.setdefault(_opt(j, "--methods"), []).extend(_opt(j, "--items").split(","))
        rows = [r for methods in by_rows for r in bench_mod.parse_methods(methods)]
        assert sorted(rows) == sorted(committed), (split, list(by_rows))
        for methods, items in by_rows.items():  # every row set runs on every item of the split, once
            assert sorted(items) == sorted(names), (split, methods)
    assert any(_opt(j, "--split") is None and _opt(j, "--json") for j in bench)  # the public items
    quality = [" ".join(j) for j in jobs if "toy.quality" in j]
    assert any("--all-prompts --per-class" in q for q in quality)
    assert any("--two-objects 48" in q for q in quality)
    assert {_opt(shlex.split(q), "--split") for q in quality} >= {"test", "dev"}


def test_smoke_mode_keeps_one_item_per_half_and_a_missing_checkpoint_is_refused(tmp_path):
    jobs = _jobs(tmp_path, {"TABLES_SMOKE": "1"})
    assert all(len(_opt(j, "--items").split(",")) == 1 for j in jobs if _opt(j, "--split") in ("test", "dev")
               and "toy.benchmark" in j)
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nothing.safetensors"), str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no checkpoint" in out.stderr
