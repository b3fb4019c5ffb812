"""Relative paths of a run config, made absolute against the directory a launch started from; removing a
run that never took a step.

The launch scripts run each process in its own folder (output/device<N>), but
the paths in a config (and in --set overrides) are written relative to where
the user launched, normally the repository root: configs/cpu_tiny.yaml says
`data.dataset_dir: output/data/default`. The launchers pass
`--paths-from <launch directory>` and the trainer resolves these fields
against it before anything reads them. Absolute paths and empty values
(no init_checkpoint) are kept.
"""
import dataclasses
import os
import shutil

from locmoe.errors import ConfigError
from pangu_sigma.training.checkpoint import is_run_entry

PATH_FIELDS = ("data.dataset_dir", "train.output_dir", "train.init_checkpoint")


def resolve_paths(cfg, base_dir, fields=PATH_FIELDS):
    """A copy of `cfg` whose relative path fields are joined to base_dir (absolute, normalised)."""
    if not os.path.isabs(base_dir):
        raise ConfigError("--paths-from", base_dir, "an absolute directory (the folder the launch started from)")
    if not os.path.isdir(base_dir):
        raise ConfigError("--paths-from", base_dir, "an existing directory")
    sections = {}
    for field in fields:
        section_name, key = field.split(".")
        section = sections.get(section_name, getattr(cfg, section_name))
        value = getattr(section, key)
        if value and not os.path.isabs(value):
            section = dataclasses.replace(section, **{key: os.path.normpath(os.path.join(base_dir, value))})
        sections[section_name] = section
    return dataclasses.replace(cfg, **sections)


def remove_run_files(output_dir, remove_folder):
    """Removes what a run wrote in output_dir (a start that took no step); the whole folder if remove_folder."""
    if remove_folder:
        shutil.rmtree(output_dir)
        return
    for name in filter(is_run_entry, os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
