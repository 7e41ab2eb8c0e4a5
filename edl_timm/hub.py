"""Pretrained EDL checkpoints on the Hugging Face Hub: the ``hub_configs/`` files, and loading.

``hub_configs/<architecture>.<tag>.yaml`` (shipped inside the package as ``edl_timm.hub_configs``)
is the one source of pretrained configs: the model families feed them to timm's
``generate_default_cfgs`` at import. Loading goes through timm's own loader (``create_model`` with
``pretrained=True``, ``arch.tag``, ``hf-hub:`` or ``local-dir:``); this module adds what timm leaves
to the user: a fast, clear answer when the Hub cannot be reached, checks of a checkpoint folder before
it is loaded, and errors that say which file is broken and what to do.
"""
import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from .attacks import REPORTED_ATTACKS

__all__ = [
    "CheckpointError", "HubConfigError", "WeightsUnavailableError", "DEFAULT_ORG",
    "hub_config_files", "load_hub_config", "validate_hub_config", "load_hub_configs", "pretrained_cfgs_for",
    "hub_model_args", "install_into_cache", "create_model", "check_checkpoint_folder",
    "sha256_file", "release_folder", "RELEASES_ENV",
]

DEFAULT_ORG = "edl-timm"
METRIC_ATTACKS = tuple(REPORTED_ATTACKS)
_REQUIRED = ("hf_hub_id", "architecture", "tag", "dataset", "threat_model", "recipe", "metrics", "license")


class HubConfigError(ValueError):
    """A ``hub_configs/`` file that is malformed or inconsistent (the message names file and field)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that cannot be fetched (no network and nothing cached)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: corrupted file, wrong architecture or wrong shapes."""


# ---------------------------------------------------------------------------------------------
# hub_configs/

def hub_config_files(directory: Optional[os.PathLike] = None) -> List[Path]:
    """The config files of ``directory`` (default: the ones shipped in the package), sorted."""
    if directory is None:
        root = resources.files("edl_timm.hub_configs")
        files = [Path(str(p)) for p in root.iterdir() if p.name.endswith((".yaml", ".yml", ".json"))]
    else:
        files = [p for p in Path(directory).iterdir() if p.suffix in (".yaml", ".yml", ".json")]
    return sorted(files)


def _fail(path: Path, field: str, what: str):
    raise HubConfigError(f"{path}: field {field!r}: {what}")


def load_hub_config(path: os.PathLike, known_architectures: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read and validate one config file; raises ``HubConfigError`` naming the file and field."""
    path = Path(path)
    try:
        text = path.read_text()
        cfg = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise HubConfigError(f"{path}: not readable as {path.suffix[1:].upper()}: {e}") from e
    return validate_hub_config(cfg, path, known_architectures)


def validate_hub_config(cfg: Any, path: os.PathLike, known_architectures: Optional[List[str]] = None) -> Dict[str, Any]:
    """Check one config (as read from ``path``); raises ``HubConfigError`` naming file and field."""
    path = Path(path)
    if not isinstance(cfg, dict):
        raise HubConfigError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    for field in _REQUIRED:
        if cfg.get(field) in (None, "", [], {}):
            _fail(path, field, "missing (required: " + ", ".join(_REQUIRED) + ")")
    arch, tag = cfg["architecture"], str(cfg["tag"])
    if not str(arch).startswith("edl_"):
        _fail(path, "architecture", f"{arch!r} is not an edl_* architecture")
    if known_architectures is not None and arch not in known_architectures:
        _fail(path, "architecture", f"{arch!r} is not registered (known: {', '.join(sorted(known_architectures))})")
    expected_name = f"{arch}.{tag}"
    if path.stem != expected_name:
        _fail(path, "tag", f"the file must be named {expected_name}{path.suffix} (architecture.tag)")
    repo = str(cfg["hf_hub_id"])
    if repo.count("/") != 1 or not all(repo.split("/")):
        _fail(path, "hf_hub_id", f"{repo!r} is not an 'organisation/name' repository id")
    for field in ("model_args", "pretrained_cfg", "recipe", "dataset", "threat_model"):
        if field in cfg and not isinstance(cfg[field], dict):
            _fail(path, field, "must be a mapping")
    for field in ("norm", "eps"):
        if field not in cfg["threat_model"]:
            _fail(path, f"threat_model.{field}", "missing")
    if not isinstance(cfg["metrics"], list):
        _fail(path, "metrics", "must be a list of measured results")
    for i, m in enumerate(cfg["metrics"]):
        where = f"metrics[{i}]"
        if not isinstance(m, dict):
            _fail(path, where, "must be a mapping")
        for field in ("attack", "accuracy", "n", "dataset"):
            if field not in m:
                _fail(path, f"{where}.{field}", "missing: a metric states its protocol (attack, n, dataset)")
        if m["attack"] not in METRIC_ATTACKS:
            _fail(path, f"{where}.attack", f"{m['attack']!r} is not one of {METRIC_ATTACKS}")
        if m["attack"] != "clean":
            for field in ("norm", "eps"):
                if field not in m:
                    _fail(path, f"{where}.{field}", f"missing: a {m['attack']} result states its threat model")
        if not (isinstance(m["accuracy"], (int, float)) and 0 <= m["accuracy"] <= 100):
            _fail(path, f"{where}.accuracy", f"{m['accuracy']!r} is not a percentage in [0, 100]")
        if not (isinstance(m["n"], int) and m["n"] > 0):
            _fail(path, f"{where}.n", f"{m['n']!r} is not a positive number of images")
    cfg["_path"] = str(path)
    return cfg


def load_hub_configs(directory: Optional[os.PathLike] = None, known_architectures=None) -> List[Dict[str, Any]]:
    """Every config of ``directory``, validated; at most one default tag per architecture."""
    cfgs = [load_hub_config(p, known_architectures) for p in hub_config_files(directory)]
    defaults: Dict[str, str] = {}
    for cfg in cfgs:
        if cfg.get("default"):
            if cfg["architecture"] in defaults:
                _fail(Path(cfg["_path"]), "default", f"{defaults[cfg['architecture']]} is already the default")
            defaults[cfg["architecture"]] = cfg["_path"]
    return cfgs


def pretrained_cfgs_for(architectures: List[str], base_cfg, directory: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """``generate_default_cfgs`` entries (``arch.tag``; the default tag marked with ``*``) for the
    shipped configs of ``architectures``, each built on ``base_cfg(architecture)``."""
    out = {}
    for cfg in load_hub_configs(directory):
        arch = cfg["architecture"]
        if arch not in architectures:
            continue
        entry = dict(base_cfg(arch))
        entry.update(cfg.get("pretrained_cfg") or {})
        entry.update(hf_hub_id=cfg["hf_hub_id"], license=cfg["license"])
        out[f"{arch}.{cfg['tag']}" + ("*" if cfg.get("default") else "")] = entry
    return out


@functools.lru_cache(maxsize=None)
def _model_args_of(directory: Optional[str]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(c["architecture"], str(c["tag"])): dict(c.get("model_args") or {}) for c in load_hub_configs(directory)}


def hub_model_args(architecture: str, tag: Optional[str], directory: Optional[os.PathLike] = None) -> Dict[str, Any]:
    """The model arguments the ``hub_configs`` entry of ``architecture.tag`` records (the arguments its
    weights were trained with; empty if none). ``directory``: default the shipped configs, read once."""
    return dict(_model_args_of(None if directory is None else str(directory)).get((architecture, tag or ""), {}))


# ---------------------------------------------------------------------------------------------
# files and the cache

def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_into_cache(folder: os.PathLike, repo_id: str, cache_dir: Optional[os.PathLike] = None,
                       revision: str = "main") -> Path:
    """Lay out ``folder``'s files in a Hugging Face cache exactly as a download of ``repo_id`` would
    (``models--org--name/blobs``, ``snapshots/<commit>/`` links, ``refs/<revision>``), so that an
    offline machine loads it through the Hub code path (``HF_HUB_OFFLINE=1``). Returns the snapshot."""
    from huggingface_hub import constants

    cache_dir = Path(cache_dir or constants.HF_HUB_CACHE)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    digests = {p.name: sha256_file(p) for p in files}
    commit = hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / digests[p.name]
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(p, tmp)
            os.replace(tmp, blob)
        link = snapshot / p.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------
# release folders

RELEASES_ENV = "EDL_TIMM_RELEASES"


def release_folder(architecture: str, tag: Optional[str]) -> Optional[Path]:
    """The release folder ``<architecture>.<tag>`` (exactly what is uploaded to the tag's Hub
    repository) of ``$EDL_TIMM_RELEASES``, else of the ``releases/`` folder of the source checkout
    this package runs from (an editable install of a clone); None when neither has it.

    ``pretrained=True`` asks the Hub (or its cache) first, so the Hub's copy is the one used wherever
    it can be had; the release folder serves a clone without network, and a tag not uploaded yet."""
    if not tag:
        return None
    roots = [Path(os.environ[RELEASES_ENV])] if os.environ.get(RELEASES_ENV) else []
    roots.append(Path(__file__).resolve().parent.parent / "releases")
    for root in roots:
        folder = root / f"{architecture}.{tag}"
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            return folder
    return None


# ---------------------------------------------------------------------------------------------
# loading

_REACHABLE: Dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub endpoint, remembered per process. huggingface_hub itself
    retries an unreachable host five times with back-off (about 25 s per file), which is what a user
    without network would otherwise wait for before seeing its error."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _REACHABLE:
        url = urllib.parse.urlparse(endpoint)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def _cached(repo_id: str, revision: Optional[str], filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return isinstance(found, str)


def _unavailable(repo_id: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot get the weights of {repo_id!r}: {why}. Provide them in one of these ways: download them "
        f"on a machine with network (`hf download {repo_id}`) and copy its Hugging Face cache here, then "
        "set HF_HUB_OFFLINE=1; or put the folder (model.safetensors + config.json) on disk and load "
        "'local-dir:/path/to/folder'; or call edl_timm.hub.install_into_cache(folder, repo_id)."
    )


@contextlib.contextmanager
def hub_access(repo_id: str, revision: Optional[str] = None) -> Iterator[None]:
    """Decide, before timm asks for ``repo_id``, whether the Hub or the local cache serves it.

    Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable): the cached copy is used, and with none
    cached the error says at once how to provide the weights. timm's loader runs unchanged inside."""
    from huggingface_hub import constants

    if not constants.is_offline_mode() and _hub_reachable():
        yield
        return
    if not (_cached(repo_id, revision, "config.json") or _cached(repo_id, revision, "model.safetensors")):
        why = ("offline mode (HF_HUB_OFFLINE) is on and the local cache has no copy" if constants.is_offline_mode()
               else f"the Hub ({constants.ENDPOINT}) cannot be reached and nothing is cached")
        raise _unavailable(repo_id, why)
    # huggingface_hub reads this flag at call time (constants.is_offline_mode), so setting it for the
    # duration of the load makes every download in timm's loader a cache lookup.
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def check_checkpoint_folder(folder: os.PathLike, require_edl: bool = True) -> Dict[str, Any]:
    """Validate a checkpoint folder (config.json + model.safetensors) before anything is built:
    the config names a registered (edl_*) architecture and the safetensors header is readable.
    Returns the config."""
    import timm
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: a checkpoint is a folder with config.json and model.safetensors")
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path} is missing: a checkpoint folder holds timm's config.json beside its weights") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}): restore or re-export the checkpoint") from e
    arch = cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise CheckpointError(f"{cfg_path}: architecture {arch!r} is not a registered timm model")
    if require_edl and not arch.startswith("edl_") and not cfg.get("edl_convert"):
        raise CheckpointError(
            f"{cfg_path}: architecture {arch!r} is not an edl_* model; load it with timm.create_model directly"
        )
    weights = folder / "model.safetensors"
    if weights.exists():
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # safetensors raises its own error types, and OSError on short files
            raise CheckpointError(
                f"{weights} is truncated or corrupted ({e}): copy or download it again"
            ) from e
    elif not any(folder.glob("*.bin")) and not any(folder.glob("*.pth")):
        raise CheckpointError(f"{folder} has no model.safetensors")
    return cfg


def _classify_load_error(source: str, e: Exception) -> Exception:
    text = str(e)
    if type(e).__name__ == "SafetensorError" or "incomplete metadata" in text or (
        "header" in text.lower() and "safetensors" in text.lower()
    ):
        return CheckpointError(f"the weights of {source} are truncated or corrupted ({text}): download or copy them again")
    if isinstance(e, RuntimeError) and ("size mismatch" in text or "Missing key" in text or "Unexpected key" in text):
        first = text.strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        return CheckpointError(
            f"the weights of {source} do not fit the model ({detail}): build the architecture and arguments the "
            "checkpoint was saved with (its config.json), or pass num_classes=... to replace the classifier"
        )
    return e


@contextlib.contextmanager
def translate_load_errors(source: str) -> Iterator[None]:
    """Re-raise timm's loading failures as ``CheckpointError`` with what to do; the half-built model
    is never returned."""
    try:
        yield
    except (WeightsUnavailableError, CheckpointError):
        raise
    except Exception as e:
        new = _classify_load_error(source, e)
        if new is e:
            raise
        raise new from e


def _create_converted(folder: Path, cfg: Dict[str, Any], **kwargs):
    """A timm model saved after ``edl_timm.convert`` (config.json's ``edl_convert``: the mode and the
    EDL arguments): timm's loader cannot build it, as the architecture alone makes a plain model. It
    is built plain, converted the same way, then given the saved weights (every key must match)."""
    import timm
    from safetensors.torch import load_file

    from .convert import convert_with_args

    spec = dict(cfg["edl_convert"])
    mode = spec.pop("mode")
    num_classes = kwargs.pop("num_classes", None)
    model = timm.create_model(cfg["architecture"], pretrained=False, **{**(cfg.get("model_args") or {}), **kwargs,
                                                                       "num_classes": cfg["num_classes"]})
    convert_with_args(model, mode, spec)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.edl_convert = dict(cfg["edl_convert"])
    # the saved preprocessing (mean, std, input size) is the one the weights were trained with
    model.pretrained_cfg = {**model.pretrained_cfg, **(cfg.get("pretrained_cfg") or {})}
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def create_model(name: str, pretrained: bool = False, require_edl: bool = True, **kwargs):
    """``timm.create_model`` for a registry name/tag, ``hf-hub:org/name`` or ``local-dir:/path``, with
    the checks above: the folder or cached snapshot is validated first, the Hub is not retried for
    minutes when unreachable, and failures name the file and the remedy."""
    import timm
    from timm.models import parse_model_name

    if os.path.isdir(name):  # a training output or a downloaded folder
        name = "local-dir:" + os.path.abspath(name)
    elif name.startswith(("/", "./", "../", "~")) or name.startswith(os.sep):
        raise CheckpointError(f"no such checkpoint folder: {name!r} (a training run's --output-dir, or a release folder)")
    source, ident = parse_model_name(name)
    if source == "local-dir":
        cfg = check_checkpoint_folder(ident, require_edl=require_edl)
        with translate_load_errors(name):
            if cfg.get("edl_convert"):
                return _create_converted(Path(ident), cfg, **kwargs)
            return timm.create_model(name, pretrained=True, **kwargs)
    if source == "hf-hub":
        repo_id, _, revision = ident.partition("@")
        with hub_access(repo_id, revision or None), translate_load_errors(name):
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(repo_id, "config.json", revision=revision or None)).parent
            if (folder / "model.safetensors").exists():  # already cached: check it before building
                check_checkpoint_folder(folder, require_edl=require_edl)
            return timm.create_model(name, pretrained=True, **kwargs)
    if require_edl and not ident.split(".")[0].startswith("edl_"):
        raise CheckpointError(f"{name!r} is not an edl_* model (known: {', '.join(timm.list_models('edl_*'))})")
    if not timm.is_model(ident.split(".")[0]):
        raise ValueError(f"unknown model {name!r}; EDL models: {', '.join(timm.list_models('edl_*'))}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)
