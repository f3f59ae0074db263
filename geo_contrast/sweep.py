r"""A grid of runs, variants x training seeds, and its table: the mean ± sd that says whether one variant beats
another by more than the spread between seeds.

    python -m geo_contrast.sweep --config=configs/fmow.py:sample --variants=moco,tp,geo,geo_tp --seeds=0-4 \
        --workdir=DIR [--config.FIELD=VALUE ...]

Each cell is an ordinary run, `python -m geo_contrast.main --config=CONFIG,variant=V --config.seed=N` with the
extra `--config.*` overrides, in its own workdir DIR/<variant>_seed<N> (its console in DIR/logs/<cell>.log).
A cell that finished with the same command is skipped, so an interrupted sweep resumes where it stopped (and an
interrupted cell resumes from its last checkpoint); cells share one XLA compilation cache (DIR/xla_cache).
After the grid, or with --table_only, DIR/table.md and DIR/table.json hold, per variant, each evaluation's val and
test top-1 (mean ± sample sd over seeds), the margin over the random-init encoder of the same seed (paired
differences; needs `config.compare_random`) and every seed's value; DIR/sweep.png draws them with error bars.

The cells run one after another on this machine. To spread a sweep over machines, give each machine its own
--variants or --seeds with a shared DIR (e.g. a bucket mounted on every host): the table is made from every
finished cell DIR holds.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

from geo_contrast import config_lib
from geo_contrast import results as results_lib

TABLE_MD = "table.md"
TABLE_JSON = "table.json"
FIGURE_PNG = "sweep.png"
LOGS_DIR = "logs"
XLA_CACHE_DIR = "xla_cache"
_SECTIONS = {"linear_eval": "frozen", "finetune": "fine-tuned"}
_SPLITS = ("val", "test")


class SweepError(ValueError):
    """A user's mistake in the sweep's command line; the message names it."""


def parse_seeds(spec):
    """[seeds] from "0-4", "0,2,7" or a mix ("0-2,9"); sorted, each once."""
    seeds = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise SweepError(f"--seeds={spec!r}: give non-negative seeds as a range or a list, e.g. --seeds=0-4 "
                             "or --seeds=0,3,7.")
        seeds.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(seeds)


def parse_variants(spec):
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in variants if v not in config_lib.VARIANTS]
    if not variants or unknown:
        raise SweepError(f"--variants={spec!r}: {', '.join(unknown) or 'none given'}; choose from "
                         f"{','.join(config_lib.VARIANTS)}.")
    return list(dict.fromkeys(variants))


def cell_name(variant, seed):
    return f"{variant}_seed{seed}"


def cell_command(config, variant, seed, workdir, overrides):
    """The main command of one cell: the variant joins the config's argument (it also picks the crops, so it
    cannot be a --config.variant override), the seed is an override."""
    path, _, arg = config.partition(":")
    if "variant=" in arg:
        raise SweepError(f"--config={config} names a variant: give the variants with --variants.")
    arg = ",".join(part for part in (arg, f"variant={variant}") if part)
    return [sys.executable, "-m", "geo_contrast.main", f"--config={path}:{arg}", f"--workdir={workdir}",
            f"--config.seed={seed}", *overrides]


def _done_path(sweep_dir, name):
    return os.path.join(sweep_dir, LOGS_DIR, f"{name}.done.json")


def _finished_command(sweep_dir, name):
    """The command (without the interpreter, whose path may differ) a cell last finished with, or None."""
    try:
        with open(_done_path(sweep_dir, name)) as f:
            return json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def run_cell(sweep_dir, variant, seed, config, overrides):
    """Runs one cell unless it already finished with the same command; returns (status, seconds)."""
    name = cell_name(variant, seed)
    command = cell_command(config, variant, seed, os.path.join(sweep_dir, name), overrides)
    if _finished_command(sweep_dir, name) == command[1:]:
        return "skipped (finished earlier)", 0.0
    log_path = os.path.join(sweep_dir, LOGS_DIR, f"{name}.log")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(sweep_dir, XLA_CACHE_DIR))
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.monotonic() - start
    if returncode != 0:
        return f"failed (exit {returncode}): {_last_error(log_path)} (log: {log_path})", seconds
    with open(_done_path(sweep_dir, name), "w") as f:
        json.dump({"command": command[1:], "seconds": round(seconds, 1)}, f)
    return "done", seconds


def _last_error(log_path):
    """The run's own one-line error, or its last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


# ---------------------------------------------------------------------------------------------------------------
# The table: pure functions of {(variant, seed): results dict}.


def _top1(all_results, section, key, split):
    report = all_results.get(section, {}).get(key, {}).get("splits", {}).get(split)
    return None if report is None else 100 * report["top1"]


def _summary(values):
    """mean, sample sd (None below two values) and n of the values present."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def aggregate(cells, variants, seeds):
    """The sweep's table as a JSON-able dict from `cells` {(variant, seed): results}. Rows: each variant's
    pretrained encoder, then the random init (from the first variant's cell of each seed that has it: the random
    encoder depends on the seed only). Per section (frozen, fine-tuned) and split: mean ± sd over seeds, every
    seed's value, and the paired margin over the random init."""
    sections = [s for s in _SECTIONS if any(s in r for r in cells.values())]
    random = {}
    for seed in seeds:
        for variant in variants:
            if (variant, seed) in cells and any(results_lib.RANDOM in cells[variant, seed].get(s, {})
                                                 for s in sections):
                random[seed] = cells[variant, seed]
                break

    def row(name, per_seed_results, key):
        out = {"row": name, "sections": {}}
        for section in sections:
            out["sections"][section] = {}
            for split in _SPLITS:
                values = {seed: _top1(r, section, key, split) for seed, r in per_seed_results.items()}
                floors = {seed: _top1(random[seed], section, results_lib.RANDOM, split) for seed in random}
                margins = [values[s] - floors[s] for s in values
                           if values[s] is not None and floors.get(s) is not None]
                out["sections"][section][split] = {
                    "top1": _summary(values.values()),
                    "per_seed": {str(seed): value for seed, value in values.items()},
                    "margin_over_random": None if key == results_lib.RANDOM else _summary(margins),
                }
        return out

    rows = [row(v, {s: cells[v, s] for s in seeds if (v, s) in cells}, "pretrained") for v in variants]
    if random:
        rows.append(row("random init", random, results_lib.RANDOM))
    return {"units": "percent top-1", "variants": variants, "seeds": seeds, "sections": sections,
            "missing_cells": [cell_name(v, s) for v in variants for s in seeds if (v, s) not in cells],
            "rows": rows}


def _pm(summary):
    if summary is None or summary["mean"] is None:
        return "-"
    return f"{summary['mean']:.2f}" + ("" if summary["sd"] is None else f" ± {summary['sd']:.2f}")


def render_markdown(table, command):
    seeds = table["seeds"]
    lines = [f"Sweep: `{command}`", "",
             f"Top-1 (%), mean ± sample sd over training seeds {', '.join(map(str, seeds))}; the margin is the "
             "paired difference to the random-init encoder of the same seed.", ""]
    for section in table["sections"]:
        header = (["variant"] + [f"{split} top-1" for split in _SPLITS] + ["val margin over random"]
                  + [f"val seed {s}" for s in seeds])
        lines += [f"**{_SECTIONS[section]}** ({section})", "", "| " + " | ".join(header) + " |",
                  "|---|" + "---:|" * (len(header) - 1)]
        for row in table["rows"]:
            cells = row["sections"][section]
            values = [row["row"]] + [_pm(cells[split]["top1"]) for split in _SPLITS]
            margin = cells["val"]["margin_over_random"]
            values.append(_pm(margin) if margin is not None else "")
            per_seed = cells["val"]["per_seed"]
            values += ["-" if per_seed.get(str(s)) is None else f"{per_seed[str(s)]:.2f}" for s in seeds]
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    if table["missing_cells"]:
        lines.append(f"Missing cells (not finished): {', '.join(table['missing_cells'])}.")
    return "\n".join(lines).rstrip() + "\n"


def write_table(sweep_dir, variants, seeds, command):
    """Reads every finished cell's results, writes table.md, table.json and sweep.png; returns the markdown."""
    cells = {}
    for variant in variants:
        for seed in seeds:
            workdir = os.path.join(sweep_dir, cell_name(variant, seed))
            if _finished_command(sweep_dir, cell_name(variant, seed)) is not None:
                cells[variant, seed] = results_lib.load(workdir)
    table = aggregate(cells, variants, seeds)
    markdown = render_markdown(table, command)
    with open(os.path.join(sweep_dir, TABLE_MD), "w") as f:
        f.write(markdown)
    with open(os.path.join(sweep_dir, TABLE_JSON), "w") as f:
        json.dump(table, f, indent=2)
    if cells:
        from geo_contrast import plots  # matplotlib (and TF through plots) only when there is something to draw.
        plots.save(plots.sweep_figure(table), os.path.join(sweep_dir, FIGURE_PNG))
    return markdown


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SweepError(message)


def main(argv=None):
    parser = _Parser(prog="python -m geo_contrast.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the config and its argument, e.g. configs/fmow.py:sample")
    parser.add_argument("--variants", required=True, help="comma-separated variants, e.g. moco,tp,geo,geo_tp")
    parser.add_argument("--seeds", required=True, help="training seeds: a range (0-4) or a list (0,3,7)")
    parser.add_argument("--workdir", required=True, help="the sweep's directory: one workdir per cell, the table")
    parser.add_argument("--table_only", action="store_true", help="only (re)write the table from finished cells")
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parser.parse_known_args(argv)
        bad = [o for o in overrides if not o.startswith("--config.")]
        if bad:
            raise SweepError(f"unknown arguments {' '.join(bad)}: only --config.FIELD=VALUE overrides pass to the "
                             "runs.")
        if any(o.startswith(("--config.seed=", "--config.variant=")) for o in overrides):
            raise SweepError("the sweep sets the seed and the variant of each cell: give them with --seeds and "
                             "--variants.")
        variants, seeds = parse_variants(args.variants), parse_seeds(args.seeds)
        sweep_dir = os.path.abspath(args.workdir)
        os.makedirs(os.path.join(sweep_dir, LOGS_DIR), exist_ok=True)
        for variant in variants:  # Refuses a config argument with a variant before anything runs.
            cell_command(args.config, variant, seeds[0], sweep_dir, overrides)
    except (SweepError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    command = " ".join(["python -m geo_contrast.sweep", shlex.join(a for a in argv if a != "--table_only")])
    failures = 0
    if not args.table_only:
        cells = [(v, s) for s in seeds for v in variants]
        for i, (variant, seed) in enumerate(cells, start=1):
            print(f"[{i}/{len(cells)}] {cell_name(variant, seed)} ...", flush=True)
            status, seconds = run_cell(sweep_dir, variant, seed, args.config, overrides)
            failures += status.startswith("failed")
            print(f"[{i}/{len(cells)}] {cell_name(variant, seed)}: {status}"
                  + (f" in {seconds / 60:.1f} min" if seconds else ""), flush=True)
    print(write_table(sweep_dir, variants, seeds, command), end="", flush=True)
    print(f"Table: {os.path.join(sweep_dir, TABLE_MD)}; figure: {os.path.join(sweep_dir, FIGURE_PNG)}")
    if failures:
        sys.stderr.write(f"error: {failures} cell(s) failed; their logs are in "
                         f"{os.path.join(sweep_dir, LOGS_DIR)}; rerun the same command to retry them (finished "
                         "cells are skipped).\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
