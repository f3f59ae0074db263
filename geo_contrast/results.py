"""WORKDIR/results.json and WORKDIR/results.md: a run's evaluations, one entry per (stage, init).

Every evaluation updates its own entry (`{"linear_eval": {key: entry}, "finetune": {key: entry}}`, key
"pretrained", "random", a checkpoint path or a weights file) and rewrites both files from the merged JSON, so
the probe and the fine-tuning of each init, and the random init beside the pretrained one, all stay side by side:
results.md shows each init's frozen and fine-tuned numbers as two columns, and the margin of each init over the
random one, the floor that says how much pretraining bought. Both files are replaced atomically.
"""

import json
import os

from geo_contrast import workdir as workdir_lib

RANDOM = "random"
STAGES = ("linear_eval", "finetune")  # The column order of results.md: frozen, then fine-tuned.
_SPLIT_ORDER = ("train", "val", "test")

# (entry key, column title) of the metrics in the markdown table, all fractions shown as percentages.
_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("macro_f1", "macro-F1"),
            ("location_top1", "location top-1"), ("location_macro_f1", "location macro-F1"))


def load(workdir):
    """The workdir's results ({} when there are none yet)."""
    path, _ = workdir_lib.results_paths(workdir)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start a fresh one.") from e


def update(workdir, key, entry, stage="linear_eval"):
    """Stores `entry` under results[stage][key] (stage: one of STAGES), rewrites results.json and results.md;
    returns the markdown."""
    all_results = load(workdir)
    all_results.setdefault(stage, {})[key] = entry
    markdown = render_markdown(all_results)
    json_path, markdown_path = workdir_lib.results_paths(workdir)
    _write_atomic(json_path, json.dumps(all_results, indent=2, sort_keys=True) + "\n")
    _write_atomic(markdown_path, markdown)
    return markdown


def _steps(entry):
    return "-" if entry.get("pretrain_step") is None else (
        f"{entry['pretrain_step']}/{entry.get('pretrain_total_steps') or '?'}")


def _cell(entry, split, name):
    metrics = (entry or {}).get("splits", {}).get(split)
    return "-" if metrics is None else f"{100 * metrics[name]:.2f}"


def render_markdown(all_results):
    """One row per (init, split) with, for each metric, the frozen (linear probe) and the fine-tuned column, then
    one margin row per (non-random init, split) over the random init."""
    by_stage = {stage: all_results.get(stage, {}) for stage in STAGES}
    keys = sorted({k for entries in by_stage.values() for k in entries},
                  key=lambda k: (k == RANDOM, k != "pretrained", k))
    header = ["init", "variant", "pretraining steps", "backbone", "selected on val (frozen / fine-tuned)", "split"]
    header += [f"{title} {label}" for _, title in _COLUMNS for label in ("frozen", "fine-tuned")]
    lines = [
        "# Results",
        "",
        "Frozen: the linear probe on the frozen backbone; fine-tuned: the backbone and a new linear classifier",
        "trained together. Each selects its epoch on val top-1 and evaluates test (when the dataset has it) once",
        "with it. Location metrics sum the softmax over all images of a location (the paper's Table 2).",
        "Percentages; '-': not run.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in keys:
        entries = [by_stage[stage].get(key) for stage in STAGES]
        first = next(e for e in entries if e is not None)
        epochs = " / ".join(_selected(e) for e in entries)
        cells = [key, first.get("variant") or "-", _steps(first), first["backbone"], epochs]
        for split in _ordered_splits({s for e in entries if e for s in e["splits"]}):
            values = [_cell(e, split, name) for name, _ in _COLUMNS for e in entries]
            lines.append("| " + " | ".join(cells + [split] + values) + " |")
    for key in keys:
        if key == RANDOM:
            continue
        entries = [by_stage[stage].get(key) for stage in STAGES]
        floors = [by_stage[stage].get(RANDOM) for stage in STAGES]
        for split in _ordered_splits({s for e in entries if e for s in e["splits"]}):
            margins = [_margin(e, f, split, name) for name, _ in _COLUMNS for e, f in zip(entries, floors)]
            if any(m != "-" for m in margins):
                lines.append("| " + " | ".join([f"{key} - random"] + [""] * 4 + [split] + margins) + " |")
    return "\n".join(lines) + "\n"


def _selected(entry):
    """What an evaluation chose on val: "38/60" (its epoch) or "l2 0.001" (the logistic readout's strength)."""
    if entry is None:
        return "-"
    if entry.get("selected_l2") is not None:
        return f"l2 {entry['selected_l2']:.3g}"
    return f"{entry['selected_epoch']}/{entry['num_epochs']}"


def _margin(entry, floor, split, name):
    if entry is None or floor is None or split not in entry["splits"] or split not in floor["splits"]:
        return "-"
    return f"{100 * (entry['splits'][split][name] - floor['splits'][split][name]):+.2f}"


def _ordered_splits(splits):
    """The split names in train, val, test order, others after them by name."""
    return sorted(splits, key=lambda split: (
        _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else len(_SPLIT_ORDER), split))


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
