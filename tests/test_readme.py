"""Every command in the README refers to things that exist, so none can rot.

CI (.ci/run) runs the README's install, test and sample commands for real. Commands that need the real
datasets or an accelerator cannot run here; for those this test checks what can rot: the module exists, the
config file and its arguments load, every `--config.FIELD` override names a real field, and every
`tfds build` names a builder folder and one of its configs.
"""

import importlib
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    """Shell commands in the README's fenced code blocks, continuation lines joined, shell loops unrolled."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        loop = None  # (variable, values) of an open `for ... do` whose body is on the next lines.
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            header = re.match(r"for (\w+) in ([^;]+); do ?(.*)", line)
            if header:
                loop, line = (header.group(1), header.group(2).split()), header.group(3)
            if line.startswith("done"):
                loop = None
            elif line.startswith(("python", "tfds ", "pytest")):
                line = line.rstrip("; &")
                variable, values = loop or ("", [None])
                commands.extend(line.replace(f"${variable}", v) if v else line for v in values)
    return commands


COMMANDS = _readme_commands()


def _load_config(spec):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("readme_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def test_the_readme_has_the_commands_a_newcomer_needs():
    assert "pytest" in COMMANDS
    assert any(c.startswith("python -m geo_contrast.main --config=configs/fmow.py:sample") for c in COMMANDS)
    assert any(c.startswith("tfds build tfds_builders/fmow") for c in COMMANDS)
    assert any(c.startswith("tfds build tfds_builders/geo_imagenet") for c in COMMANDS)
    assert any("geo_contrast.benchmark" in c for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m geo_contrast.")])
def test_python_commands_name_real_modules_configs_and_fields(command):
    args = shlex.split(command)
    spec = importlib.util.find_spec(args[2])  # Not imported: the CLIs each define absl flags of the same names.
    assert spec is not None, f"{command}: no module {args[2]}"
    assert "def main(" in open(spec.origin).read(), f"{args[2]} has no main()"
    options = dict(a[2:].split("=", 1) for a in args[3:] if a.startswith("--") and "=" in a)
    if "config" not in options:
        return
    config = _load_config(options["config"])
    for name in options:
        if name.startswith("config."):
            node = config
            for part in name.split(".")[1:]:
                assert part in node, f"{command}: --{name} is not a config field"
                node = node[part]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("tfds build")])
def test_tfds_build_commands_name_real_builders_and_configs(command):
    args = shlex.split(command)
    folder = args[2]
    name = os.path.basename(folder)
    assert os.path.isfile(os.path.join(ROOT, folder, f"{name}_dataset_builder.py")), command
    module = importlib.import_module(f"tfds_builders.{name}.{name}_dataset_builder")
    configs = {c.name for c in module.Builder.BUILDER_CONFIGS}
    for arg in args[3:]:
        if arg.startswith("--config="):
            assert arg.split("=", 1)[1] in configs, f"{command}: no builder config {arg}"


def test_the_readme_lists_every_field_a_resume_may_change():
    from geo_contrast import config_lib
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("**Resuming with another config**"):text.index("**A damaged checkpoint**")]
    listed = set(re.findall(r"`([a-z_.]+)`", section))
    assert {f for fields in config_lib.RESUMABLE.values() for f in fields} <= listed
