"""The model cache and the only ways stages load a model: safetensors weights, remote code only when trusted.

Named models (tiny, tasks-sft, smollm2-135m) are built once by builder.py (which also resolves a spec to a folder)
and cached here."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from spin_ray.config import ConfigError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPIN_RAY_CACHE``, else ``~/.cache/spin_ray``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SPIN_RAY_CACHE") or "~/.cache/spin_ray").expanduser()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    # Locking the folder itself leaves no lock file behind.
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build_once(out_dir: str | os.PathLike, build: Callable[[Path], None]) -> str:
    """Run ``build(tmp_dir)`` unless ``out_dir`` already holds a model, then rename tmp_dir into place.

    The rename makes a crash leave no half-written folder, and the lock keeps concurrent
    callers (e.g. several Ray workers) from building the same folder twice.
    """
    out = Path(out_dir).expanduser().resolve()
    if is_model_dir(out):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(out.parent):
        if is_model_dir(out):
            return str(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} exists but is not a model folder (no config.json); remove it")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            build(tmp)
            # mkdtemp makes 0700 and transformers writes weights 0600; cached models should read like any file.
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            os.replace(tmp, out)  # an empty out_dir is replaced atomically too
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def local_model(uri: str, cache_dir: str | None = None) -> str:
    """A local folder for `uri`: an object-store model (s3://, gs://) is copied once per node into the cache.

    The cache is keyed by the URI and every file's name, size and modification time, so a model re-trained (or
    re-uploaded) at the same URI is copied again instead of being served stale.
    """
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((f.path[len(root):], f.size, f.mtime_ns) for f in listing if f.type == pafs.FileType.File)
    key = hashlib.sha256(repr((uri, files)).encode()).hexdigest()[:16]
    return build_once(cache_root(cache_dir) / "remote" / key, lambda tmp: pafs.copy_files(uri, str(tmp)))


# Suffixes of data, weight and config files: `runs/model.safetensors` is a mistyped path, never a hub id.
_LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".yaml", ".safetensors", ".bin", ".pt", ".gguf")


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` that is not a missing local path: a file suffix, or a local folder named like the `org` part
    (`data/train` where ./data exists), means the user meant a path and would otherwise get a network error later."""
    return (_HUB_ID.fullmatch(spec) is not None and Path(spec).suffix not in _LOCAL_SUFFIXES
            and not Path(spec.split("/")[0]).exists())


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_model(path: str, *, dtype: "torch.dtype", trust_remote_code: bool = False) -> "PreTrainedModel":
    """Every stage loads θ through here: safetensors only (a pickle checkpoint can run code when read), and a
    model's own Python code only when the user set trust_remote_code."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """θ's tokenizer. Each stage loads it before the weights, so a local folder is checked here first (check_model):
    a library caller that skipped the CLI's checks gets the fix at the stage's start, not an engine's traceback."""
    from transformers import AutoTokenizer

    check_model(path, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_config(path: str, *, trust_remote_code: bool = False) -> "PretrainedConfig":
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def check_model(path: str, trust_remote_code: bool = False) -> None:
    """Refuse, before any actor loads it, a local model folder that would fail or be unsafe later: weights only in
    pickle files, custom code that trust_remote_code has not allowed, no tokenizer or no chat template (every prompt
    is rendered with the template). A pad token is not needed: training and scoring pack sequences without padding
    (template.pack_varlen), and the transformers generation fallback pads with EOS where there is none. Reads JSON
    files only, no weights."""
    import json

    folder = Path(path)
    if "://" in path or not folder.is_dir():
        return  # a hub id or object store URI: checked where it is downloaded
    files = [f for f in folder.iterdir() if f.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        pickles = sorted(f.name for f in files if f.suffix in PICKLE_WEIGHTS)
        found = f"only pickle weights ({', '.join(pickles)}), which can run code when loaded" if pickles else \
            "no *.safetensors weights"
        raise ConfigError(f"model {path!r} holds {found}; models load from safetensors only. Convert a trusted copy "
                          "with `AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(DST)` (writes "
                          "model.safetensors) and set model=DST")
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"model {path!r} asks for its own Python code (config.json auto_map: "
                          f"{sorted(config['auto_map'])}), which would run on every node; set trust_remote_code=true "
                          "only if you trust it, or use a model that transformers supports natively")
    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text()) if tok_path.is_file() else {}
    if not tok and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"model {path!r} has no tokenizer (tokenizer_config.json / tokenizer.json); save the "
                          "tokenizer into the folder with `tokenizer.save_pretrained(FOLDER)`")
    if not (tok.get("chat_template") or (folder / "chat_template.jinja").is_file()
            or (folder / "chat_template.json").is_file() or (folder / "additional_chat_templates").is_dir()):
        raise ConfigError(f"model {path!r} has no chat template (none in tokenizer_config.json, no "
                          "chat_template.jinja): SPIN renders every prompt with it. Use a chat/instruct (SFT) model, "
                          "or set `tokenizer.chat_template = ...` and `tokenizer.save_pretrained(FOLDER)`")
