"""ImageNet weights of the timm encoders in a local folder, so that training needs no network.

Usage, from the repository root::

    python -m utils.weights fetch (--all | --CFG config/<pipeline>/<stage>.yaml | --backbone NAME) [key=value ...]
    python -m utils.weights list                                   # every full-profile backbone: present / missing
    python -m utils.weights check (--pipeline NAME | --CFG FILE) [key=value ...]   # the pre-flight check, one line per backbone

``fetch`` (needs internet) builds each backbone the full-profile stage configs name with timm's
own loading, ``timm.create_model(name, pretrained=True)`` (Hugging Face hub or URL), and stores
its state dict as ``<folder>/<backbone>.safetensors`` plus an entry of ``<folder>/manifest.json``
(backbone -> file, sha256, bytes, source), both written atomically; a backbone already there is
kept. The folder is ``weights/`` at the repository root (git-ignored), or ``$WEIGHTS_DIR``; copy
it to an offline machine. models/encoder.py loads a pretrained backbone from it when the
manifest lists it (timm's pretrained loading from the file: first conv adapted to ``in_chans``,
classifier dropped; no network), otherwise timm downloads. A file whose sha256 differs from the
manifest is an error.

Pre-flight (:func:`check_available`, run by ``utils.registry.check_components`` before any run
folder exists): a pretrained encoder needs its file here, the Hugging Face cache, or a network
that works. Whether the network works is decided without a long hang: ``HF_HUB_OFFLINE=1`` means
it does not; otherwise one TCP connection to timm's download host (the Hugging Face endpoint, or
the weight URL's host; the HTTPS proxy instead when one is set) must open within 3 s.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import re
import socket
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from utils import cli
from utils.config import ConfigError, load_config
from utils.errors import InputError
from utils.io import atomic_path, write_text

if TYPE_CHECKING:
    from models.encoder import EncoderSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
WEIGHTS_ENV = "WEIGHTS_DIR"
PROBE_TIMEOUT_S = 3.0  # a reachable host answers a TCP connect in well under a second
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loading reads


# ---- the local folder -----------------------------------------------------------------------------
def weights_dir() -> Path:
    """``$WEIGHTS_DIR``, else ``weights/`` at the repository root."""
    return Path(os.environ.get(WEIGHTS_ENV) or ROOT / "weights")


def manifest_path() -> Path:
    return weights_dir() / "manifest.json"


def read_manifest() -> dict[str, dict[str, Any]]:
    """backbone -> {file, sha256, bytes, source}; {} when there is no manifest yet."""
    path = manifest_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}); delete it and fetch again") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_weights(backbone: str) -> Path | None:
    """The checked weight file of ``backbone`` in the folder, None when the folder lacks it.

    Raises InputError when the file's sha256 differs from the manifest's (a partial copy or
    another model's file).
    """
    entry = read_manifest().get(backbone)
    if entry is None:
        return None
    path = weights_dir() / entry["file"]
    if not path.is_file():
        return None
    if sha256(path) != entry["sha256"]:
        raise InputError(
            f"{path}: sha256 differs from {manifest_path()} (a damaged or replaced file); "
            f"fetch it again: python -m utils.weights fetch --backbone {backbone}"
        )
    return path


def store(backbone: str, state_dict: Mapping[str, torch.Tensor], source: str) -> Path:
    """Write ``state_dict`` as ``<folder>/<backbone>.safetensors`` and its manifest entry."""
    path = weights_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', backbone)}.safetensors"
    # Own contiguous copies: safetensors refuses views and tensors that share memory.
    tensors = {
        k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    manifest = read_manifest()
    manifest[backbone] = {
        "file": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "source": source,
    }
    write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", manifest_path())
    return path


def describe(backbone: str) -> str:
    """``<folder>/x.safetensors (44.7 MiB, sha256 1a2b3c4d5e6f)`` of a backbone in the manifest."""
    entry = read_manifest()[backbone]
    return (
        f"{weights_dir() / entry['file']} ({entry['bytes'] / 2**20:.1f} MiB, "
        f"sha256 {entry['sha256'][:12]})"
    )


# ---- where timm would download from -----------------------------------------------------------------
def download_source(backbone: str) -> tuple[str | None, str | None]:
    """(Hugging Face hub id, URL) timm loads ``backbone``'s pretrained weights from.

    timm prefers the hub when the model has a hub id. Raises InputError when timm has no
    pretrained weights of that name.
    """
    if backbone.startswith("hf-hub:"):
        return backbone.removeprefix("hf-hub:"), None
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError as err:  # an unknown pretrained tag
        raise InputError(f"encoder backbone {backbone!r}: {err}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise InputError(
            f"timm has no pretrained weights named {backbone!r}; set "
            "model.params.encoder.pretrained=false or model.params.encoder.checkpoint_path=FILE"
        )
    return cfg.hf_hub_id or None, cfg.url or None


def in_hub_cache(hub_id: str) -> bool:
    """True when timm's hub loading finds the weights in the Hugging Face cache (no network)."""
    repo, _, revision = hub_id.partition("@")
    return any(
        isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str)
        for name in HUB_FILES
    )


def download_host(hub_id: str | None, url: str | None) -> tuple[str, int]:
    """(host, port) a download connects to first: the HTTPS proxy when one applies."""
    parts = urlsplit(hf_constants.ENDPOINT if hub_id else url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname, proxy_parts.port or 80
    return host, port


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value (huggingface_hub's spelling): no downloads at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


@cache
def reachable(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` opens within PROBE_TIMEOUT_S (once per process).

    The connect runs in a daemon thread so that a slow name lookup, which the socket timeout does
    not bound, cannot hold the caller longer either.
    """
    opened = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            opened.set()
        except OSError:
            pass

    threading.Thread(target=connect, daemon=True).start()
    return opened.wait(PROBE_TIMEOUT_S)


# ---- pre-flight -------------------------------------------------------------------------------------
def encoder_spec(cfg: Mapping[str, Any]) -> EncoderSpec | None:
    """The ``model.params.encoder`` of a resolved config as an EncoderSpec (None: no timm
    encoder, or an ensemble of trained experiments, which builds no model of its own)."""
    from models.encoder import EncoderSpec  # models/encoder.py imports this module

    if cfg.get("ensemble"):
        return None
    params = cfg["model"]["params"] or {}
    return EncoderSpec.from_params(params["encoder"]) if "encoder" in params else None


def weights_source(spec: EncoderSpec) -> str:
    """Where ``spec``'s weights come from, as one phrase; InputError when they cannot be had."""
    if spec.checkpoint_path:
        if not Path(spec.checkpoint_path).is_file():
            raise InputError(
                f"model.params.encoder.checkpoint_path {spec.checkpoint_path} not found"
            )
        return f"checkpoint_path {spec.checkpoint_path}"
    if not spec.pretrained:
        return "not pretrained (trained from scratch)"
    local = local_weights(spec.backbone)
    if local is not None:
        return f"local file {local}"
    hub_id, url = download_source(spec.backbone)
    if hub_id and in_hub_cache(hub_id):
        return f"Hugging Face cache ({hub_id})"
    host, port = download_host(hub_id, url)
    if not offline() and reachable(host, port):
        return f"download by timm from {host}"
    why = (
        "HF_HUB_OFFLINE is set"
        if offline()
        else f"{host}:{port} unreachable in {PROBE_TIMEOUT_S:g} s"
    )
    raise InputError(
        f"no ImageNet weights of encoder {spec.backbone!r} here (not in {manifest_path()} nor the "
        f"Hugging Face cache; {why}); either fetch them on a machine with internet "
        f"(python -m utils.weights fetch --CFG <stage config>, or --backbone {spec.backbone}) and "
        f"copy {weights_dir().name}/ here, or set model.params.encoder.checkpoint_path=FILE, or "
        "model.params.encoder.pretrained=false"
    )


def check_available(cfg: Mapping[str, Any]) -> str | None:
    """Where the encoder weights of ``cfg`` come from (None: no timm encoder).

    Raises InputError (one line naming the backbone and the ways out) when pretrained weights are
    requested and neither a local file nor a download can provide them.
    """
    spec = encoder_spec(cfg)
    return None if spec is None else weights_source(spec)


def without_pretrained(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config (plain dict) whose encoder loads no pretrained weights.

    For models built to receive a trained checkpoint's state dict, which replaces every weight:
    building them must neither download nor need the original weight file (checkpoint_path).
    """
    data = copy.deepcopy(dict(config))
    encoder = (data["model"]["params"] or {}).get("encoder")
    if encoder is not None:
        encoder.update(pretrained=False, checkpoint_path=None)
    return data


# ---- the stage configs ------------------------------------------------------------------------------
def stage_configs(pipeline: str | None = None) -> list[Path]:
    """``config/<pipeline>/<stage>.yaml`` of one pipeline (None: of every pipeline), sorted."""
    if pipeline is not None and not (CONFIG_DIR / pipeline / "base.yaml").is_file():
        valid = sorted(p.parent.name for p in CONFIG_DIR.glob("*/base.yaml"))
        raise ConfigError(f"unknown pipeline {pipeline!r}; valid: {', '.join(valid)}")
    pattern = f"{pipeline or '*'}/*.yaml"
    return sorted(p for p in CONFIG_DIR.glob(pattern) if p.name != "base.yaml")


def encoders_of(
    configs: Sequence[Path], overrides: Sequence[str] = ()
) -> dict[str, list[tuple[str, EncoderSpec]]]:
    """backbone -> [(config name, spec)] of the configs with a timm encoder, resolved with overrides."""
    found: dict[str, list[tuple[str, EncoderSpec]]] = {}
    for path in configs:
        spec = encoder_spec(load_config(path, overrides))
        if spec is not None:
            found.setdefault(spec.backbone, []).append((f"{path.parent.name}/{path.stem}", spec))
    return found


# ---- commands ---------------------------------------------------------------------------------------
def fetch(backbone: str) -> str:
    """Download ``backbone`` through timm into the folder (kept when there); one line of what happened."""
    present = local_weights(backbone)
    if present is not None:
        return f"{backbone}: present, {describe(backbone)}"
    hub_id, url = download_source(backbone)
    host, port = download_host(hub_id, url)
    if offline() or not reachable(host, port):
        raise InputError(
            f"cannot fetch {backbone}: {host}:{port} unreachable or HF_HUB_OFFLINE set"
        )
    model = timm.create_model(backbone, pretrained=True)
    store(backbone, model.state_dict(), hub_id or url)
    return f"{backbone}: fetched, {describe(backbone)}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_p = sub.add_parser("fetch", help="download backbones into the weights folder")
    which = fetch_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every stage config of every pipeline")
    which.add_argument("--CFG", help="one stage config, config/<pipeline>/<stage>.yaml")
    which.add_argument("--backbone", help="one timm model name, e.g. convnext_tiny")
    sub.add_parser("list", help="every full-profile backbone: present / missing")
    check_p = sub.add_parser("check", help="pre-flight check of a pipeline's stage configs")
    stages = check_p.add_mutually_exclusive_group(required=True)
    stages.add_argument("--pipeline", help="every stage config of config/<pipeline>/")
    stages.add_argument("--CFG", help="one stage config")
    for p in (fetch_p, check_p):
        p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. profile=demo")
    args = parser.parse_args(argv)
    if getattr(args, "backbone", None) and args.overrides:
        parser.error("key=value overrides apply to --CFG or --all, not --backbone")
    return args


def _configs(args: argparse.Namespace) -> list[Path]:
    if getattr(args, "CFG", None):
        return [Path(args.CFG)]
    return stage_configs(getattr(args, "pipeline", None))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    with cli.running(logging.WARNING):  # the configs it loads would log every override
        if args.command == "fetch":
            names = (
                [args.backbone]
                if args.backbone
                else list(encoders_of(_configs(args), args.overrides))
            )
            for name in names:
                print(fetch(name), flush=True)
        elif args.command == "list":
            for name, uses in encoders_of(stage_configs()).items():
                state = "missing" if local_weights(name) is None else describe(name)
                print(f"{name} ({', '.join(c for c, _ in uses)}): {state}")
            print(
                f"weights folder: {weights_dir()} ({len(read_manifest())} in {manifest_path().name})"
            )
        else:
            found = encoders_of(_configs(args), args.overrides)
            if not found:
                print(f"{args.pipeline or args.CFG}: no timm encoder in its stage configs")
            for name, uses in found.items():
                lines: dict[str, list[str]] = {}
                for config, spec in uses:
                    lines.setdefault(weights_source(spec), []).append(config)
                for source, configs in lines.items():
                    print(f"{name} ({', '.join(configs)}): {source}")


if __name__ == "__main__":
    main()
