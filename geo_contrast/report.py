"""Several runs' results in the paper's Table 1 layout, beside the paper's numbers.

    python -m geo_contrast.report WORKDIR [WORKDIR ...] [--split=val|test] [--label STEM=ROW ...]
        [--out=table.md] [--json=table.json]

Each workdir's results.json holds the evaluations of one or more inits (`linear_eval`: frozen backbone;
`finetune`: fine-tuned). Every entry goes to one row of the paper's Table 1: a checkpoint (key "pretrained" or
its path) by its pretraining variant, the random init's fine-tuning to "supervised, scratch" (its frozen probe is
an extra row, the floor that says what pretraining bought), imported weights (`.safetensors`) to the row a
`--label` names. Runs of one row (seeds, or the same variant in several workdirs) are averaged with their sample
standard deviation, so a difference to the paper can be read against the spread between seeds.

Only results.json is read, without JAX or TensorFlow: the table builds anywhere, in a second.
"""

import argparse
import json
import os
import statistics
import sys

from geo_contrast import results as results_lib
from geo_contrast import workdir as workdir_lib

FROZEN = "linear_eval"
FINETUNED = "finetune"
SECTION_TITLES = {FROZEN: "frozen", FINETUNED: "fine-tuned"}

# The table's metric columns: (metric of a split's report, results.json section, title).
COLUMNS = (
    ("macro_f1", FROZEN, "F1 frozen"),
    ("macro_f1", FINETUNED, "F1 fine-tuned"),
    ("top1", FROZEN, "top-1 frozen"),
    ("top1", FINETUNED, "top-1 fine-tuned"),
    ("location_top1", FROZEN, "location top-1 frozen"),
)

# The paper's numbers (fMoW val, ResNet-50, 200 epochs; percentages) in COLUMNS order: Table 1's F1 and top-1,
# frozen and fine-tuned, then Table 2's per-location top-1 (frozen; the paper gives it for one row only).
# None where the paper has no number.
PAPER = {
    "supervised, ImageNet init": (None, 64.72, None, 69.07, None),
    "supervised, scratch": (None, 64.71, None, 69.05, None),
    "geo-location classification only": (48.96, 52.23, 52.40, 56.59, None),
    "MoCo-v2 pretrained on ImageNet": (31.55, 57.36, 37.05, 62.90, None),
    "MoCo-v2": (55.47, 60.61, 60.69, 64.34, None),
    "MoCo-v2+Geo": (61.60, 66.60, 64.07, 69.04, None),
    "MoCo-v2+TP": (64.53, 67.34, 68.32, 71.55, None),
    "MoCo-v2+Geo+TP": (63.13, 66.56, 66.33, 70.60, 72.76),
}

# The row of a checkpoint's evaluation, by the variant it was pretrained with.
VARIANT_ROWS = {
    "moco": "MoCo-v2",
    "tp": "MoCo-v2+TP",
    "geo": "MoCo-v2+Geo",
    "geo_tp": "MoCo-v2+Geo+TP",
    "geo_only": "geo-location classification only",
}
RANDOM_FROZEN_ROW = "random init (frozen floor)"
RANDOM_FINETUNED_ROW = "supervised, scratch"
IMPORTED_SUFFIX = ".safetensors"
MISSING = "missing"
SPLITS = ("val", "test")


class ReportError(ValueError):
    """A user's mistake in the command line or a results.json; the message names it."""


def parse_labels(specs):
    """{file stem: row} from `--label STEM=ROW` strings; a ROW that names one of the paper's rows in any case is
    that row, so imported weights land beside the paper's number."""
    paper_rows = {name.lower(): name for name in PAPER}
    labels = {}
    for spec in specs:
        stem, _, row = (part.strip() for part in spec.partition("="))
        stem = stem.removesuffix(IMPORTED_SUFFIX)
        if not stem or not row:
            raise ReportError(f"--label {spec!r} is not STEM=ROW (e.g. --label in1k='supervised, ImageNet init').")
        row = paper_rows.get(row.lower(), row)
        if labels.get(stem, row) != row:
            raise ReportError(f"--label names two rows for {stem}: {labels[stem]!r} and {row!r}.")
        labels[stem] = row
    return labels


def imported_stem(key):
    """The file name stem of an imported weights key (a `.safetensors` path), else None."""
    name = os.path.basename(key)
    return name.removesuffix(IMPORTED_SUFFIX) if name.endswith(IMPORTED_SUFFIX) else None


def row_name(section, key, entry, labels):
    """The table row of one results entry (see the module docstring)."""
    if key == results_lib.RANDOM:
        return RANDOM_FINETUNED_ROW if section == FINETUNED else RANDOM_FROZEN_ROW
    stem = imported_stem(key)
    if stem is not None:
        return labels.get(stem, f"imported: {stem}")
    variant = entry.get("variant")
    return VARIANT_ROWS.get(variant, f"variant {variant}")


def aggregate(runs, labels, split="val"):
    """The table as a JSON-able dict, from `runs`: (workdir, results dict) pairs, one per workdir.

    Each row has, per section, the sources (workdir and key) of its runs that evaluated `split`, and per column
    the mean and sample sd of their percentages (None without runs; sd None with one run), the paper's number
    and the difference. The paper's rows come first in its order, every one of them even without runs; then the
    rows it does not have, by name.
    """
    found = {}  # row -> section -> [(source, report)]
    datasets, backbones, used_stems = set(), set(), set()
    for workdir, all_results in runs:
        for section in SECTION_TITLES:
            entries = all_results.get(section, {}) if isinstance(all_results, dict) else None
            if not isinstance(entries, dict):
                raise ReportError(f"{workdir}/{workdir_lib.RESULTS_JSON}: no {{section: {{init: entry}}}} layout.")
            for key, entry in sorted(entries.items()):
                used_stems.add(imported_stem(key))
                report = _split_report(entry, split, f"{workdir}/{workdir_lib.RESULTS_JSON} [{section}][{key}]")
                if report is None:
                    continue
                datasets.add(str(entry.get("dataset")))
                backbones.add(str(entry.get("backbone")))
                source = workdir if key == "pretrained" else f"{workdir} ({key})"
                row = found.setdefault(row_name(section, key, entry, labels), {})
                row.setdefault(section, []).append((source, report))
    rows = [_row(name, found.get(name, {})) for name in PAPER]
    rows += [_row(name, found[name]) for name in sorted(set(found) - set(PAPER))]
    return {
        "split": split,
        "units": "percent",
        "workdirs": [workdir for workdir, _ in runs],
        "datasets": sorted(datasets),
        "backbones": sorted(backbones),
        "unused_labels": sorted(set(labels) - used_stems),
        "rows": rows,
    }


def _split_report(entry, split, where):
    """The entry's report of `split` (None when it has none), checked to hold every metric of the table."""
    splits = entry.get("splits") if isinstance(entry, dict) else None
    if not isinstance(splits, dict):
        raise ReportError(f"{where} has no \"splits\": not an evaluation entry.")
    report = splits.get(split)
    if report is None:
        return None
    for metric, _, _ in COLUMNS:
        if not isinstance(report.get(metric) if isinstance(report, dict) else None, (int, float)):
            raise ReportError(f"{where}: its {split} split has no number {metric!r}.")
    return report


def _row(name, sections):
    paper = PAPER.get(name, (None,) * len(COLUMNS))
    cells = []
    for (metric, section, title), paper_value in zip(COLUMNS, paper):
        values = [100 * report[metric] for _, report in sections.get(section, [])]
        mean = statistics.mean(values) if values else None
        cells.append({
            "column": title,
            "metric": metric,
            "section": section,
            "mean": mean,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "paper": paper_value,
            "difference": None if mean is None or paper_value is None else mean - paper_value,
        })
    return {
        "row": name,
        "in_paper": name in PAPER,
        "sources": {section: [source for source, _ in sections.get(section, [])] for section in SECTION_TITLES},
        "cells": cells,
    }


def render_markdown(table):
    """The table in markdown: a line on what it shows, the rows, and where each row's runs came from."""
    header = ["method"]
    for cell in table["rows"][0]["cells"]:
        header += [cell["column"], "paper", "diff"]
    header += [f"n {title}" for title in SECTION_TITLES.values()]
    count = len(table["workdirs"])
    datasets, backbones = (", ".join(table[name]) or "-" for name in ("datasets", "backbones"))
    lines = [
        (f"Split {table['split']}, {count} workdir{'s' * (count != 1)} (dataset {datasets}; backbone {backbones}). "
         f"Values are percentages: mean ± sample sd over n runs; \"{MISSING}\": no run, \"-\": the paper has no "
         "number. Paper: Table 1, and Table 2 for location top-1."),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for row in table["rows"]:
        values = [row["row"]]
        for cell in row["cells"]:
            values += [_ours(cell), _number(cell["paper"]), _number(cell["difference"], "+")]
        values += [str(len(row["sources"][section])) for section in SECTION_TITLES]
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", "Runs of each row:", ""]
    for row in table["rows"]:
        parts = [f"{SECTION_TITLES[section]}: {', '.join(sources)}"
                 for section, sources in row["sources"].items() if sources]
        lines.append(f"- {row['row']}: {'; '.join(parts) or 'none'}")
    return "\n".join(lines) + "\n"


def _ours(cell):
    if cell["mean"] is None:
        return MISSING
    return _number(cell["mean"]) + ("" if cell["sd"] is None else f" ± {cell['sd']:.2f}")


def _number(value, sign=""):
    return "-" if value is None else f"{value:{sign}.2f}"


def _read(workdir):
    """The results of one workdir; ReportError when it has none or they cannot be read."""
    path, _ = workdir_lib.results_paths(workdir)
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir} is not a directory: give the workdirs of runs.")
    if not os.path.exists(path):
        raise ReportError(f"{workdir} has no {workdir_lib.RESULTS_JSON}: its evaluation stages (linear_eval, "
                          "finetune) have not run there.")
    return results_lib.load(workdir)


def _write(path, text, option):
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise ReportError(f"cannot write {option}={path}: {e.strerror or e}.") from e


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line and exit 1, as every other error of the command."""

    def error(self, message):
        raise ReportError(message)


def main(argv=None):
    parser = _Parser(prog="python -m geo_contrast.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run workdirs holding results.json")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="the split whose metrics are shown (default val: the paper's numbers are on val)")
    parser.add_argument("--label", action="append", default=[], metavar="STEM=ROW",
                        help="the row of imported weights STEM.safetensors (a paper row name, any case, or a new "
                             "name); repeatable")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", help="also write the aggregated numbers here as JSON")
    try:
        args = parser.parse_args(argv)
        labels = parse_labels(args.label)
        unique = {}  # realpath -> the workdir as given: a workdir given twice counts once.
        for workdir in args.workdirs:
            unique.setdefault(os.path.realpath(workdir), os.path.normpath(workdir))
        table = aggregate([(workdir, _read(workdir)) for workdir in unique.values()], labels, args.split)
        markdown = render_markdown(table)
        if args.out:
            _write(args.out, markdown, "--out")
        if args.json:
            _write(args.json, json.dumps(table, indent=2) + "\n", "--json")
    except ValueError as e:  # ReportError, or results.load's unreadable results.json.
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    for stem in table["unused_labels"]:
        sys.stderr.write(f"warning: --label {stem}=... matches no imported {stem}{IMPORTED_SUFFIX} in the "
                         "results.\n")
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
