"""Reading and writing the weight files of an HF model directory, one tensor at a time.

Reading: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model*.bin` (opened with `torch.load(weights_only=True)`, one file at a time). Tensors
are fetched by name, so a converter holds one tensor (safetensors) or one `.bin` shard at once,
never the whole model.

Writing: safetensors shards of at most `max_shard_bytes`, named as `save_pretrained` names
them, with an index; into a temporary directory that the caller renames into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.convert.hf_config import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _safetensors():
    try:
        import safetensors
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ImportError("HF conversion needs the `safetensors` package: "
                          "pip install safetensors") from None
    return safetensors


class HFWeightReader:
    """Name -> tensor access over the weight files of one HF model directory."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._bin_cache: tuple[Optional[Path], dict] = (None, {})
        index = next((self.dir / n for n in (SAFE_INDEX, BIN_INDEX) if (self.dir / n).is_file()),
                     None)
        if index is not None:
            files = self._files_from_index(index)
        else:
            files = sorted(self.dir.glob("*.safetensors")) or sorted(
                self.dir.glob("pytorch_model*.bin"))
            if not files:
                raise ConversionError(f"{self.dir}: no weights (expected model.safetensors, "
                                      f"{SAFE_INDEX} or pytorch_model*.bin)")
        for f in files:
            self._scan(f)

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not an HF weight index ({e})") from None
        files = sorted({self.dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return files

    def _scan(self, path: Path) -> None:
        """Record which tensors a file holds and their shapes (headers only for safetensors)."""
        if path.suffix == ".safetensors":
            st = _safetensors()
            try:
                with st.safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self._add(name, path, tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
            except Exception as e:  # safetensors raises its own error types
                raise ConversionError(f"{path}: cannot read safetensors header ({e})") from None
        else:
            for name, t in self._load_bin(path).items():
                self._add(name, path, tuple(t.shape), t.dtype)

    def _add(self, name, path, shape, dtype):
        if name in self._files:
            raise ConversionError(f"tensor {name} appears in both {self._files[name].name} and "
                                  f"{path.name}")
        self._files[name], self._shapes[name], self._dtypes[name] = path, shape, dtype

    def _load_bin(self, path: Path) -> dict:
        if self._bin_cache[0] != path:
            self._bin_cache = (None, {})  # drop the previous shard before reading the next
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ConversionError(f"{path}: cannot read with torch.load(weights_only=True) "
                                      f"({e})") from None
            self._bin_cache = (path, state)
        return self._bin_cache[1]

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def shard_bytes(self) -> dict[Path, int]:
        sizes: dict[Path, int] = {}
        for name, path in self._files.items():
            sizes[path] = sizes.get(path, 0) + _nbytes(self._shapes[name], self._dtypes[name])
        return sizes

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path.suffix == ".safetensors":
            with _safetensors().safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return self._load_bin(path)[name].clone()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty(0, dtype=dtype).element_size()


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def _st_dtype(name: str) -> torch.dtype:
    try:
        return _ST_DTYPES[name]
    except KeyError:
        raise ConversionError(f"unsupported safetensors dtype {name}") from None


class SafetensorsShardWriter:
    """Accumulate tensors in order and flush a shard whenever the next would overflow it.

    Shards are written as `model-0000k.safetensors.part` first; `close()` renames them to the
    `save_pretrained` names (`model-0000k-of-0000n.safetensors`) once n is known and writes the
    index. Peak memory: one shard plus the tensor being added.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: Optional[dict] = None):
        self.dir = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f"model-{len(self._written) + 1:05d}.safetensors.part"
        _safetensors().torch.save_file(self._pending, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending:
            self._flush()
        n = len(self._written)
        weight_map, final = {}, []
        for k, (path, names) in enumerate(self._written, start=1):
            name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.dir / name)
            final.append(self.dir / name)
            weight_map.update({t: name for t in names})
        if n > 1:
            (self.dir / SAFE_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                indent=2) + "\n")
        return final


def copy_remote_code(source: Path, target: Path) -> list[str]:
    """Copy the `.py` files of an HF directory (`configuration_internlm2.py`, ...): the code its
    `auto_map` names, which we carry from import to export but never write ourselves."""
    import shutil

    names = sorted(p.name for p in Path(source).glob("*.py"))
    for name in names:
        shutil.copy2(Path(source) / name, Path(target) / name)
    return names
