"""The Zarr v3 store of embeddings: one chunk per image along axis 0, fp16, zstd + CRC32C.

Only the driver creates or resizes arrays (DESIGN rule 3); workers open the group
read-write and assign whole rows, each of which is its own chunk, so concurrent
workers never touch the same file. Every chunk carries a checksum and every row's
owner is stored beside it (``image_id``: the SHA-256 of the image the row holds), so a
damaged row is found (``batchseg.io.store_integrity``) and an intact one can be matched
to its image without the manifest.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

STORE_NAME = "embeddings.zarr"
STORE_DTYPE = "float16"
ROW_ID_ARRAY = "image_id"  # (N, 32) uint8: the SHA-256 digest of the image each row holds
ROW_ID_BYTES = 32
FINE_TOKENS = "clip_tokens_fine"  # clip_tokens at the fine canvas (embed --fine-canvas)
FINE_CLS = "clip_cls_fine"

if TYPE_CHECKING:  # zarr takes seconds to import under load; imported where the store is used
    import zarr


@dataclass(frozen=True)
class ModelGeometry:
    """Array shapes that the loaded models produce, read from the models themselves."""

    clip_canvas: int | None = None
    clip_patch: int | None = None
    clip_grid: int | None = None
    clip_dense_dim: int | None = None  # D: the joint image-text space
    clip_key_dim: int | None = None  # K: keys for key smoothing
    sam_image_size: int | None = None
    sam_embed_shape: tuple[int, int, int] | None = None
    clip_kind: str | None = None  # "vit", "resnet" or "timm"
    clip_token_dim: int | None = None  # W: channels of the stored last-block tokens / feature map
    clip_token_grid: int | None = None  # side of the stored token grid (ViT: = clip_grid)
    # The second CLIP canvas (embed --fine-canvas), None when there is none.
    clip_fine_canvas: int | None = None
    clip_fine_grid: int | None = None
    clip_fine_token_grid: int | None = None

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every array this geometry stores, by array name.

        ``clip_tokens`` (W, t, t): what every dense head is computed from (the last ViT
        block's input patch tokens, or a CNN tower's last feature map); ``clip_cls``
        (W,): the ViT class token at that block's input; ``clip_global`` (D,).
        With a fine canvas, ``clip_tokens_fine`` (W, tf, tf) and ``clip_cls_fine`` (W,) are
        the same at that canvas.
        """
        shapes: dict[str, tuple[int, ...]] = {}
        if self.clip_canvas is not None:
            t = self.clip_token_grid or self.clip_grid
            shapes["clip_tokens"] = (self.clip_token_dim, t, t)
            if self.clip_kind == "vit":
                shapes["clip_cls"] = (self.clip_token_dim,)
            shapes["clip_global"] = (self.clip_dense_dim,)
            if self.clip_fine_canvas is not None:
                fine = self.clip_fine_token_grid or self.clip_fine_grid
                shapes[FINE_TOKENS] = (self.clip_token_dim, fine, fine)
                if self.clip_kind == "vit":
                    shapes[FINE_CLS] = (self.clip_token_dim,)
        if self.sam_embed_shape is not None:
            shapes["sam"] = tuple(self.sam_embed_shape)
        return shapes

    def to_json(self) -> dict:
        data = asdict(self)
        if data["sam_embed_shape"] is not None:
            data["sam_embed_shape"] = list(data["sam_embed_shape"])
        if not self.has_fine:  # what builds before the fine canvas recorded: keys hashed from it stay valid
            for name in ("clip_fine_canvas", "clip_fine_grid", "clip_fine_token_grid"):
                del data[name]
        return data

    @property
    def has_fine(self) -> bool:
        """Whether the build stores CLIP tokens at a second, finer canvas."""
        return self.clip_fine_canvas is not None

    @classmethod
    def from_json(cls, data: dict) -> "ModelGeometry":
        data = dict(data)
        if data.get("sam_embed_shape") is not None:
            data["sam_embed_shape"] = tuple(data["sam_embed_shape"])
        return cls(**data)


def store_path(out: Path) -> Path:
    return out / STORE_NAME


def ensure_store(out: Path, geometry: ModelGeometry, rows: int) -> None:
    """Create the arrays if missing and grow them to at least ``rows`` rows (driver only)."""
    import zarr  # imported where used: a no-op rerun never opens the store
    from zarr.codecs import Crc32cCodec, ZstdCodec
    group = zarr.open_group(str(store_path(out)), mode="a", zarr_format=3)
    shapes = {**geometry.array_shapes(), ROW_ID_ARRAY: (ROW_ID_BYTES,)}
    for name, shape in shapes.items():
        if name in group:
            array = group[name]
            if tuple(array.shape[1:]) != tuple(shape):
                raise RuntimeError(f"{name} in {store_path(out)} has rows of shape {array.shape[1:]}, expected {shape}")
            if array.shape[0] < rows:
                array.resize((rows, *shape))
        else:
            group.create_array(
                name,
                shape=(rows, *shape),
                chunks=(1, *shape),
                dtype="uint8" if name == ROW_ID_ARRAY else STORE_DTYPE,
                # The checksum last: it covers the compressed bytes as they lie on disk.
                compressors=[ZstdCodec(level=3), Crc32cCodec()],
                fill_value=0,
            )


def store_rows(out: Path) -> int:
    """Number of rows the arrays have (0 if there is no store yet)."""
    path = store_path(out)
    if not path.exists():
        return 0
    import zarr
    group = zarr.open_group(str(path), mode="r")
    return max((group[name].shape[0] for name in group.array_keys()), default=0)


class RowWriter:
    """A worker's handle for writing whole rows into existing arrays."""

    def __init__(self, out: Path) -> None:
        import zarr
        self._group = zarr.open_group(str(store_path(out)), mode="r+")
        # Every row gets its chunk, even an all-zero one: a missing chunk means damage.
        self._arrays = {name: self._group[name].with_config({"write_empty_chunks": True})
                        for name in self._group.array_keys()}

    def write(self, name: str, row: int, value: np.ndarray) -> None:
        array = self._arrays[name]
        if row >= array.shape[0]:
            raise RuntimeError(f"row {row} is outside {name} ({array.shape[0]} rows): the driver must grow arrays first")
        array[row] = value.astype(array.dtype, copy=False)

    def write_owner(self, row: int, image_id: str) -> None:
        """Record which image ``row`` holds (stores made before owners were kept have no such array)."""
        if ROW_ID_ARRAY in self._arrays:
            self.write(ROW_ID_ARRAY, row, np.frombuffer(bytes.fromhex(image_id), dtype=np.uint8))


def row_owners(out: Path, rows: Iterable[int]) -> dict[int, str]:
    """The image id stored with each of ``rows`` that has one (stores older than owners have none)."""
    path = store_path(out)
    if not path.exists():
        return {}
    import zarr
    group = zarr.open_group(str(path), mode="r")
    if ROW_ID_ARRAY not in group:
        return {}
    array = group[ROW_ID_ARRAY]
    owners = {}
    for row in rows:
        if row >= array.shape[0]:
            continue
        try:
            value = np.asarray(array[row])
        except (ValueError, RuntimeError, OSError):  # a damaged owner is no owner: the row is recomputed
            continue
        if value.any():
            owners[int(row)] = value.tobytes().hex()
    return owners


class CheckedRowReader:
    """The store opened read-only for a worker that reads a few rows at a time, each checked.

    A missing or damaged chunk raises ``DamagedRowError`` (never read back as zeros).
    """

    def __init__(self, out: Path) -> None:
        import zarr
        self.out = out
        self._group = zarr.open_group(str(store_path(out)), mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def read(self, name: str, row: int) -> np.ndarray:
        from batchseg.io.store_integrity import read_row_checked
        return read_row_checked(self.out, self._group, name, row)


def read_row(out: Path, name: str, row: int) -> np.ndarray:
    import zarr
    group = zarr.open_group(str(store_path(out)), mode="r")
    return np.asarray(group[name][row])


def open_array(out: Path, name: str) -> zarr.Array:
    import zarr
    return zarr.open_group(str(store_path(out)), mode="r")[name]


def iter_rows(out: Path, name: str, rows: Sequence[int], chunk_rows: int = 1024) -> Iterator[np.ndarray]:
    """Stored rows ``rows`` of array ``name``, ``chunk_rows`` at a time, in the given order.

    Yields (m, *row_shape) arrays in the stored dtype, so memory stays O(chunk_rows) rows
    however many are asked for. A missing or damaged row raises ``DamagedRowError``.
    """
    from batchseg.io.store_integrity import check_rows_present, read_row_checked

    array = open_array(out, name)
    for start in range(0, len(rows), chunk_rows):
        wanted = np.asarray(rows[start:start + chunk_rows], dtype=np.int64)
        order = np.argsort(wanted, kind="stable")  # sorted reads, then back to the asked order
        check_rows_present(out, array, wanted)  # a missing chunk reads back as zeros
        try:
            values = np.asarray(array.oindex[wanted[order]])
        except (ValueError, RuntimeError, OSError):  # name the damaged row
            import zarr
            group = zarr.open_group(str(store_path(out)), mode="r")
            values = np.stack([read_row_checked(out, group, name, int(row)) for row in wanted[order]])
        result = np.empty_like(values)
        result[order] = values
        yield result
