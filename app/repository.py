"""Finding models on disk: the model repository, its names, and the default model.

A repository is a directory whose immediate sub-folders each hold a model (a `manifest.json` beside its
ONNX files), named by the sub-folder's name, as in Triton's model repository. `VAE_MODEL_DIR` is a
repository of one, named by its manifest; with neither setting, the shipped models are served. Nothing here
loads a model: app/registry.py does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from model.manifest import DEFAULT_MODEL_DIR, MANIFEST_FILENAME

# The shipped models by their served names: the VAE (the default) and the two baselines it is compared with.
SHIPPED_MODELS = {
    "mnist-vae": DEFAULT_MODEL_DIR,
    "mnist-ae": DEFAULT_MODEL_DIR.parent / "comparison" / "mnist-ae",
    "mnist-pca": DEFAULT_MODEL_DIR.parent / "comparison" / "mnist-pca",
}
SHIPPED_DEFAULT = "mnist-vae"
# A model name is one path segment: letters, digits, '.', '_' and '-', starting with a letter or digit.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RepositoryError(Exception):
    """The configured models cannot be found: a missing repository, no models in it, a bad default."""


@dataclass(frozen=True)
class ModelSources:
    """Where each model of the server lives, by name (sorted), and which one the unprefixed routes serve."""

    model_dirs: dict[str, Path]
    default_name: str


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def manifest_name(model_dir: Path) -> str | None:
    """The `name` a model directory's manifest gives itself, or None when it cannot be read."""
    try:
        name = json.loads((model_dir / MANIFEST_FILENAME).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and is_model_name(name) else None


def holds_manifest(folder: Path) -> bool:
    try:
        return folder.is_dir() and (folder / MANIFEST_FILENAME).is_file()
    except PermissionError:
        return False


def scan_repository(root: Path) -> dict[str, Path]:
    """The models of a repository directory: every immediate sub-folder with a manifest, by folder name."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    found = {
        folder.name: folder
        for folder in sorted(root.iterdir())
        # The name first: a volume's root-only lost+found must not be looked into.
        if is_model_name(folder.name) and holds_manifest(folder)
    }
    if not found:
        raise RepositoryError(
            f"model repository {root} has no models: put each model (encoder.onnx, decoder.onnx and "
            "manifest.json) in a sub-folder named after the model"
        )
    return found


def model_sources(settings: Settings) -> ModelSources:
    """The models the settings describe: the repository, the one model directory, or the shipped models."""
    if settings.model_repository is not None and settings.model_dir is not None:
        raise RepositoryError(
            "set either model_repository (a folder of models) or model_dir (one model), not both"
        )
    if settings.model_repository is not None:
        model_dirs = scan_repository(settings.model_repository)
        fallback = min(model_dirs)
    elif settings.model_dir is not None:
        name = manifest_name(settings.model_dir) or settings.model_dir.name or "model"
        model_dirs, fallback = {name: settings.model_dir}, name
    else:
        model_dirs = {name: SHIPPED_MODELS[name] for name in sorted(SHIPPED_MODELS)}
        fallback = SHIPPED_DEFAULT
    default = settings.default_model
    if default is None:
        default = next(iter(model_dirs)) if len(model_dirs) == 1 else fallback
    elif default not in model_dirs:
        raise RepositoryError(f"default model {default!r} is not served; the models are {shown(model_dirs)}")
    unknown = sorted(set(settings.load_models) - set(model_dirs))
    if unknown:
        raise RepositoryError(f"load_models names {shown(unknown)}, but the models are {shown(model_dirs)}")
    return ModelSources(model_dirs, default)


def models_to_load_at_start(settings: Settings, sources: ModelSources) -> list[str]:
    """Every model in control mode 'none'; in 'explicit', the default and those named in load_models."""
    if settings.model_control_mode == "none":
        return list(sources.model_dirs)
    wanted = {sources.default_name, *settings.load_models}
    return [name for name in sources.model_dirs if name in wanted]


def shown(names: Iterable[str]) -> str:
    """Names for a message, quoted and comma-separated."""
    return ", ".join(repr(name) for name in names)
