"""WORKDIR/results.json and WORKDIR/results.md: the linear-evaluation results of a run, one entry per init.

Every linear evaluation updates its own entry (`{"linear_eval": {key: entry}}`, key "pretrained", "random" or
a checkpoint path) and rewrites both files from the merged JSON, so evaluating init=random after
init=pretrained in the same workdir keeps both and the markdown shows the margin of each pretrained backbone
over the random one: the floor that says how much pretraining bought. Both files are replaced atomically.
"""

import json
import os
import re

from geo_contrast import workdir as workdir_lib

RANDOM = "random"
_SPLIT_ORDER = ("train", "val", "test")

# (entry key, column title) of the metrics in the markdown table, all fractions shown as percentages.
_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("macro_f1", "macro-F1"),
            ("location_top1", "location top-1"), ("location_macro_f1", "location macro-F1"))


def slug(key):
    """A file-name-safe form of a results key ("pretrained", "random" or a checkpoint path)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", key).strip("_")


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


def update(workdir, key, entry):
    """Stores `entry` under results["linear_eval"][key], rewrites results.json and results.md; returns the
    markdown."""
    all_results = load(workdir)
    all_results.setdefault("linear_eval", {})[key] = entry
    markdown = render_markdown(all_results["linear_eval"])
    json_path, markdown_path = workdir_lib.results_paths(workdir)
    _write_atomic(json_path, json.dumps(all_results, indent=2, sort_keys=True) + "\n")
    _write_atomic(markdown_path, markdown)
    return markdown


def render_markdown(entries):
    """One table row per (init, split), then one margin row per (non-random init, split) over random."""
    keys = sorted(entries, key=lambda k: (k == RANDOM, k != "pretrained", k))
    header = ["init", "variant", "pretraining steps", "backbone", "selected epoch", "split"]
    header += [title for _, title in _COLUMNS]
    lines = [
        "# Linear evaluation",
        "",
        "Frozen backbone, linear classifier; the epoch is selected on val top-1 and test (when the dataset has",
        "it) is evaluated once with that epoch's classifier. Location metrics sum the softmax over all images",
        "of a location (the paper's Table 2). Percentages.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in keys:
        entry = entries[key]
        steps = "-" if entry.get("pretrain_step") is None else (
            f"{entry['pretrain_step']}/{entry.get('pretrain_total_steps') or '?'}")
        cells = [key, entry.get("variant") or "-", steps, entry["backbone"],
                 f"{entry['selected_epoch']}/{entry['num_epochs']}"]
        for split, metrics in _ordered_splits(entry["splits"]):
            values = [f"{100 * metrics[name]:.2f}" for name, _ in _COLUMNS]
            lines.append("| " + " | ".join(cells + [split] + values) + " |")
    if RANDOM in entries:
        floor = entries[RANDOM]["splits"]
        for key in keys:
            if key == RANDOM:
                continue
            for split, metrics in _ordered_splits(entries[key]["splits"]):
                if split in floor:
                    margins = [f"{100 * (metrics[name] - floor[split][name]):+.2f}" for name, _ in _COLUMNS]
                    lines.append("| " + " | ".join([f"{key} - random"] + [""] * 4 + [split] + margins) + " |")
    return "\n".join(lines) + "\n"


def _ordered_splits(splits):
    """(split, metrics) pairs in train, val, test order (results.json stores them sorted by name)."""
    return sorted(splits.items(), key=lambda item: (
        _SPLIT_ORDER.index(item[0]) if item[0] in _SPLIT_ORDER else len(_SPLIT_ORDER), item[0]))


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
