"""The ExCP checkpoint codec (Li et al., ICML 2024, arXiv 2406.11257) as pure numpy functions.

A checkpoint holds, per parameter tensor, the weights W_t and Adam's moments m_t and v_t.
Given the *reconstruction* W_hat_{t-1} of the previous checkpoint (closed loop, so coding
errors do not add up along the chain):

  dW      = W_t - W_hat_{t-1}
  r_w     = min(2.5, alpha / sqrt(mean v_t)) * median |dW|   (the lower middle value, as torch)
  keep    = |dW| > r_w
  keep_o  = keep & (|m_t| > beta * mean |m_t|)              (one mask for m and v)
  dW[keep], m_t[keep_o], v_t[keep_o]: each quantized by 1-D k-means to 2^bits - 1 centres;
           index 0 is exactly 0, so the codebook is [0, c_1 .. c_{2^bits - 1}]
  W_hat_t = W_hat_{t-1} + codebook[index]                    (in float32)

The moments are coded as they are, not as residuals (they decorrelate within hundreds of
steps). A keyframe (no reference: the first checkpoint, or every n-th) stores W, m and v
exactly. Codebooks are float32: float16 would round Adam's v (~1e-9) to 0. A part with at
most 2^bits - 1 kept values is stored raw. Leaves that are neither weights nor moments (step
counts) are stored exactly.

File: MAGIC, the header's length (u32, little-endian), a JSON header (the config, the entropy
coder, caller metadata, and per tensor its name, dtypes, shape and section sizes), the
entropy-coded body (bit-packed masks, codebooks and indices; LZMA as the paper's 7-zip, or
zstd), then the SHA-256 of every byte before it. `encode` returns the reconstruction that
`decode` computes from the file, bit for bit, because it is computed by `decode`'s code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import math
import struct
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import zstandard

from paperjax.ops import checks

MAGIC = b"PJEXCP\x01\n"
PREFIX_BYTES = len(MAGIC) + 4  # the magic and the header's length (u32)
FORMAT_VERSION = 1
CODERS = ("lzma", "zstd", "none")
DEFAULT_LEVEL = {"lzma": 9, "zstd": 19, "none": 0}
# A keyframe's float arrays: LZMA codes raw float bytes at ~2 MB/s for a few percent, zstd level 3 at >100 MB/s.
EXACT_CODER = ("zstd", 3)
LEVELS = {"lzma": range(0, 10), "zstd": range(1, 23), "none": range(0, 1)}
_DIGEST = 32
Arrays = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExcpConfig:
  """The paper's thresholds (alpha, beta), quantization bits, k-means iterations and the entropy coder.

  `coder` codes the residual files' streams and every file's other leaves; `level` is its
  LZMA preset 0..9 or zstd level 1..22 (None: 9 and 19). A keyframe's exact float arrays
  always use zstd level 3 (`EXACT_CODER`): entropy coders gain a few percent on float bytes,
  and LZMA would take minutes per GB.
  """

  alpha: float = 5e-5
  beta: float = 2.0
  bits: int = 4
  kmeans_iters: int = 25
  coder: Literal["lzma", "zstd", "none"] = "lzma"
  level: int | None = None

  def __post_init__(self):
    # Python numbers only: the header is JSON, which has no numpy scalars (np.float64 is a float, np.float32 is not).
    for name in ("alpha", "beta"):
      x = getattr(self, name)
      if not (_is_number(x, float) and math.isfinite(x) and x >= 0):
        raise ValueError(f"{name}: expected a finite Python float >= 0, got {x!r}")
    if not (_is_number(self.bits, int) and 1 <= self.bits <= 8):
      raise ValueError(f"bits: expected an int, 1 <= bits <= 8, got {self.bits!r}")
    if not (_is_number(self.kmeans_iters, int) and self.kmeans_iters >= 0):
      raise ValueError(f"kmeans_iters: expected an int >= 0, got {self.kmeans_iters!r}")
    if not (isinstance(self.coder, str) and self.coder in CODERS):
      raise ValueError(f"coder: expected one of {CODERS}, got {self.coder!r}")
    if self.level is not None and not (_is_number(self.level, int) and self.level in LEVELS[self.coder]):
      levels = LEVELS[self.coder]
      raise ValueError(f"level: expected {levels.start}..{levels.stop - 1} for {self.coder}, got {self.level!r}")

  @property
  def coder_level(self) -> int:
    return DEFAULT_LEVEL[self.coder] if self.level is None else self.level


def _is_number(x: Any, kind: type) -> bool:
  """An int (for kind int), or an int or float (for kind float); never a bool."""
  return isinstance(x, (int, float) if kind is float else int) and not isinstance(x, bool)


class Checkpoint(NamedTuple):
  """Flat name -> array maps: weights, Adam's m and v (same names and shapes), other leaves (kept exactly)."""

  weights: Arrays
  m: Arrays
  v: Arrays
  other: Arrays

  @property
  def nbytes(self) -> int:
    """The dense size: every array's bytes."""
    return sum(x.nbytes for group in self for x in group.values())


# ---------------------------------------------------------------------------- the formulas


def median_lower(x: np.ndarray) -> float:
  """The lower of the two middle values (torch.median's convention), not their average."""
  flat = np.asarray(x).ravel()
  if flat.size == 0:
    raise ValueError("x: expected a non-empty array, got size 0")
  k = (flat.size - 1) // 2
  return float(np.partition(flat, k)[k])


def masks(dw: np.ndarray, m: np.ndarray, v: np.ndarray, *, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
  """(keep, keep_o): the paper's weight-momentum joint shrinking of one tensor.

  keep = |dW| > min(2.5, alpha / sqrt(mean v)) * median|dW|, keep_o = keep & (|m| > beta *
  mean|m|). Thresholds are computed and compared in float64; mean v = 0 gives the 2.5 cap.
  """
  dw, m, v = (np.asarray(x) for x in (dw, m, v))
  if not dw.shape == m.shape == v.shape:
    raise ValueError(f"dw, m, v: expected one shape, got {dw.shape}, {m.shape}, {v.shape}")
  for name, x in (("dw", dw), ("m", m), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name}: expected a float array, got {x.dtype}")
  # v is Adam's second moment: a negative one has no square root (NaN ratio, every weight kept).
  checks.check_values("v", v, lambda a: ~(a >= 0), "second moments >= 0")
  mean_v = float(np.mean(v, dtype=np.float64))
  ratio = min(2.5, alpha / math.sqrt(mean_v)) if mean_v > 0 else 2.5
  abs_dw = np.abs(dw.astype(np.float64))
  keep = abs_dw > ratio * median_lower(abs_dw)
  abs_m = np.abs(m.astype(np.float64))
  return keep, keep & (abs_m > beta * float(np.mean(abs_m)))


def kmeans_1d(x: np.ndarray, k: int, iters: int = 25) -> np.ndarray:
  """k centres (ascending, float32) of Lloyd's algorithm on the values of x.

  Deterministic, with no seed: the centres start at the quantiles (i + 1/2) / k, and each
  iteration is exact over every value (sorted values and prefix sums; a value on a midpoint
  joins the lower centre, as `assign` puts it). An empty cluster keeps its centre.
  """
  xs = np.sort(np.asarray(x, np.float64).ravel())
  n = xs.size
  if n == 0 or k < 1:
    raise ValueError(f"x, k: expected a non-empty array and k >= 1, got size {n} and k={k}")
  checks.check_finite("x", xs)  # a NaN would make every centre it touches NaN
  centres = xs[((np.arange(k) + 0.5) * n / k).astype(np.int64)]
  prefix = np.concatenate([[0.0], np.cumsum(xs)])
  for _ in range(iters):
    edges = np.concatenate([[0], np.searchsorted(xs, (centres[1:] + centres[:-1]) / 2, side="right"), [n]])
    counts = np.diff(edges)
    means = (prefix[edges[1:]] - prefix[edges[:-1]]) / np.maximum(counts, 1)
    updated = np.sort(np.where(counts > 0, means, centres))
    if np.array_equal(updated, centres):
      break
    centres = updated
  return centres.astype(np.float32)


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """The index of the nearest of the ascending `centres` for each value of x (ties: the lower)."""
  c = centres.astype(np.float64)
  return np.searchsorted((c[1:] + c[:-1]) / 2, np.asarray(x, np.float64), side="left").astype(np.uint8)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
  """Unsigned integers < 2^bits, `bits` bits each, least significant first (4 bits: two per byte)."""
  _check_bits(bits)
  values = np.asarray(values)
  if values.ndim != 1 or (values.size and not np.issubdtype(values.dtype, np.integer)):
    raise TypeError(f"values: expected a 1-d integer array, got {values.dtype} of shape {values.shape}")
  checks.check_in("values", values, 0, 2**bits - 1, what="integers")  # a larger one would lose its high bits
  planes = (values.astype(np.uint8)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
  """The inverse of `pack_bits` for n values (data must be exactly ceil(n * bits / 8) bytes)."""
  _check_bits(bits)
  if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)) or n < 0:
    raise ValueError(f"n: expected an int >= 0, got {n!r}")
  if len(data) != math.ceil(n * bits / 8):  # a short one would pad with zeros, a long one hide trailing bytes
    raise ValueError(f"data: expected {math.ceil(n * bits / 8)} bytes for {n} values of {bits} bits, got {len(data)}")
  planes = np.unpackbits(np.frombuffer(data, np.uint8), count=n * bits, bitorder="little").reshape(n, bits)
  return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def _check_bits(bits: Any) -> None:
  if not isinstance(bits, (int, np.integer)) or isinstance(bits, (bool, np.bool_)) or not 1 <= bits <= 8:
    raise ValueError(f"bits: expected an int in [1, 8], got {bits!r}")


# ---------------------------------------------------------------------------- sections


def _code_part(values: np.ndarray, bits: int, iters: int) -> bytes:
  """The kept values of one part: raw float32 if at most 2^bits - 1, else a codebook and packed indices."""
  k = 2**bits - 1
  values = values.astype(np.float32)
  if values.size <= k:
    return values.tobytes()
  centres = kmeans_1d(values, k, iters)
  return centres.tobytes() + pack_bits(assign(values, centres) + 1, bits)


def _decode_part(data: bytes, n: int, bits: int) -> np.ndarray:
  k = 2**bits - 1
  expected = 4 * n if n <= k else 4 * k + math.ceil(n * bits / 8)
  if len(data) != expected:
    raise ValueError(f"blob: a part of {n} values should take {expected} bytes, got {len(data)}")
  if n <= k:
    return np.frombuffer(data, np.float32, count=n)
  codebook = np.concatenate([np.zeros(1, np.float32), np.frombuffer(data, np.float32, count=k)])
  return codebook[unpack_bits(data[4 * k :], bits, n)]


def _scatter(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
  out = np.zeros(mask.shape, np.float32)
  out[mask] = values
  return out


def _residual_sections(w, m, v, reference, cfg: ExcpConfig) -> tuple[list[bytes], list[int]]:
  """The five sections of a coded tensor: keep mask, dW, keep_o mask (over kept entries), m, v."""
  dw = w.astype(np.float32) - reference.astype(np.float32)
  keep, keep_o = masks(dw, m, v, alpha=cfg.alpha, beta=cfg.beta)
  sections = [
    np.packbits(keep.ravel(), bitorder="little").tobytes(),
    _code_part(dw[keep], cfg.bits, cfg.kmeans_iters),
    np.packbits(keep_o[keep], bitorder="little").tobytes(),
    _code_part(m[keep_o], cfg.bits, cfg.kmeans_iters),
    _code_part(v[keep_o], cfg.bits, cfg.kmeans_iters),
  ]
  return sections, [int(keep.sum()), int(keep_o.sum())]


def _unpack_mask(data: bytes, n: int) -> np.ndarray:
  if len(data) != math.ceil(n / 8):
    raise ValueError(f"blob: a mask over {n} entries should take {math.ceil(n / 8)} bytes, got {len(data)}")
  return np.unpackbits(np.frombuffer(data, np.uint8), count=n, bitorder="little").astype(bool)


def _decode_residual(sections: list[bytes], record: dict, reference: np.ndarray, bits: int):
  shape, size = tuple(record["shape"]), math.prod(record["shape"])
  n_keep, n_keep_o = record["kept"]
  if reference.shape != shape:
    raise ValueError(f"reference[{record['name']!r}]: expected shape {shape}, got {reference.shape}")
  keep, keep_in_kept = _unpack_mask(sections[0], size), _unpack_mask(sections[2], n_keep)
  if int(keep.sum()) != n_keep or int(keep_in_kept.sum()) != n_keep_o:
    raise ValueError(f"{record['name']}: the masks disagree with the header's kept counts {record['kept']}")
  keep_o = np.zeros(size, bool)
  keep_o[np.flatnonzero(keep)[keep_in_kept]] = True
  dw = _scatter(keep, _decode_part(sections[1], n_keep, bits))
  w = (reference.astype(np.float32).ravel() + dw).astype(record["dtypes"][0]).reshape(shape)
  m = _scatter(keep_o, _decode_part(sections[3], n_keep_o, bits)).astype(record["dtypes"][1]).reshape(shape)
  v = _scatter(keep_o, _decode_part(sections[4], n_keep_o, bits)).astype(record["dtypes"][2]).reshape(shape)
  return w, m, v


# ---------------------------------------------------------------------------- files

# The component each section of a record kind belongs to; the body is one coded stream per component.
COMPONENTS = ("masks", "weights", "m", "v", "other")
SECTION_COMPONENTS = {
  "exact": ("weights", "m", "v"),
  "residual": ("masks", "weights", "masks", "m", "v"),
  "other": ("other",),
}


def _check_inputs(ckpt: Checkpoint, reference: Arrays | None, cfg: ExcpConfig, meta: Any) -> None:
  if not isinstance(ckpt, Checkpoint):
    raise TypeError(f"ckpt: expected an excp.Checkpoint(weights, m, v, other), got {type(ckpt).__name__}")
  if not isinstance(cfg, ExcpConfig):
    raise TypeError(f"cfg: expected an excp.ExcpConfig, got {cfg!r}")
  if meta is not None:
    try:
      json.dumps(dict(meta))
    except (TypeError, ValueError) as e:
      raise TypeError(f"meta: expected a mapping of JSON-serialisable values, got {meta!r} ({e})") from None
  mappings = ckpt._asdict() | {"reference": {} if reference is None else reference}
  for label, group in mappings.items():
    if not isinstance(group, Mapping):
      raise TypeError(f"{label}: expected a name -> array mapping, got {type(group).__name__}")
  groups = {"m": ckpt.m, "v": ckpt.v} | ({} if reference is None else {"reference": reference})
  for label, group in groups.items():
    if set(group) != set(ckpt.weights):
      raise ValueError(f"{label}: expected the weights' names, got {sorted(set(group) ^ set(ckpt.weights))} differing")
  for name, w in ckpt.weights.items():
    for label, x in [("weights", w)] + [(label, group[name]) for label, group in groups.items()]:
      if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{label}[{name!r}]: expected an array, got {type(x).__name__}")
      if x.shape != w.shape:
        raise ValueError(f"{label}[{name!r}]: expected shape {w.shape}, got {x.shape}")
      if not _is_float(x.dtype):
        raise ValueError(f"{label}[{name!r}]: expected a floating dtype, got {x.dtype}")
      if not np.all(np.isfinite(x)):
        raise ValueError(f"{label}[{name!r}]: expected finite values, got {int(np.sum(~np.isfinite(x)))} non-finite")


def _is_float(dtype: np.dtype) -> bool:
  return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def fingerprint(weights: Arrays) -> str:
  """SHA-256 over the names, dtypes, shapes and bytes of `weights`: what a residual file is coded against."""
  digest = hashlib.sha256()
  for name in sorted(weights):
    x = np.ascontiguousarray(weights[name])
    digest.update(f"{name}|{x.dtype}|{x.shape}|".encode())
    digest.update(x.tobytes())
  return digest.hexdigest()


def _compress(data: bytes, coder: str, level: int) -> bytes:
  if coder == "lzma":
    return lzma.compress(data, preset=level)
  if coder == "zstd":
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
  return data


def _decompress(data: bytes, coder: str, size: int) -> bytes:
  if coder == "lzma":
    return lzma.decompress(data)
  if coder == "zstd":
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
  return data


def encode(
  ckpt: Checkpoint, reference: Arrays | None, cfg: ExcpConfig, *, meta: Mapping[str, Any] | None = None
) -> tuple[bytes, Checkpoint]:
  """The file of `ckpt` coded against `reference` (W_hat_{t-1}; None: a keyframe), and its decoding.

  `meta` (JSON-serialisable) is stored in the header for the caller (step, parent).
  """
  _check_inputs(ckpt, reference, cfg, meta)
  records: list[dict[str, Any]] = []
  streams: dict[str, list[bytes]] = {c: [] for c in COMPONENTS}
  for name, w in ckpt.weights.items():
    m, v = ckpt.m[name], ckpt.v[name]
    record: dict[str, Any] = {"name": name, "shape": list(w.shape), "dtypes": [str(x.dtype) for x in (w, m, v)]}
    if reference is None or w.size == 0:
      record["kind"], sections = "exact", [np.ascontiguousarray(x).tobytes() for x in (w, m, v)]
    else:
      sections, record["kept"] = _residual_sections(w, m, v, reference[name], cfg)
      record["kind"] = "residual"
    records.append(record)
    for component, section in zip(SECTION_COMPONENTS[record["kind"]], sections, strict=True):
      streams[component].append(section)
    record["sizes"] = [len(s) for s in sections]
  for name, x in ckpt.other.items():
    x = np.asarray(x)
    record = {"name": name, "kind": "other", "shape": list(x.shape), "dtypes": [str(x.dtype)], "sizes": [x.nbytes]}
    records.append(record)
    streams["other"].append(np.ascontiguousarray(x).tobytes())
  raw = {c: b"".join(parts) for c, parts in streams.items()}
  coders: dict[str, tuple[str, int]] = {c: (cfg.coder, cfg.coder_level) for c in COMPONENTS}
  if reference is None:
    coders.update(dict.fromkeys(("weights", "m", "v"), EXACT_CODER))
  coded = {c: _compress(data, *coders[c]) for c, data in raw.items()}
  header = {
    "format": FORMAT_VERSION,
    "config": {"alpha": cfg.alpha, "beta": cfg.beta, "bits": cfg.bits, "kmeans_iters": cfg.kmeans_iters},
    "coder": cfg.coder,
    "level": cfg.coder_level,
    "reference": None if reference is None else fingerprint(reference),
    "streams": {
      c: {"raw": len(raw[c]), "coded": len(coded[c]), "coder": coders[c][0], "level": coders[c][1]} for c in COMPONENTS
    },
    "meta": dict(meta or {}),
    "records": records,
  }
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  body = MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + b"".join(coded[c] for c in COMPONENTS)
  blob = body + hashlib.sha256(body).digest()
  return blob, decode(blob, reference)


def header_end(prefix: bytes) -> int:
  """Where the header ends, from a file's first PREFIX_BYTES bytes."""
  if prefix[: len(MAGIC)] != MAGIC:
    raise ValueError(f"blob: expected an ExCP file starting with {MAGIC!r}, got {bytes(prefix[: len(MAGIC)])!r}")
  if len(prefix) < PREFIX_BYTES:
    raise ValueError(f"blob: truncated, {len(prefix)} bytes")
  return PREFIX_BYTES + struct.unpack("<I", prefix[len(MAGIC) : PREFIX_BYTES])[0]


def _split_header(blob: bytes) -> tuple[dict[str, Any], int]:
  end = header_end(blob[:PREFIX_BYTES])
  if len(blob) < end:
    raise ValueError(f"blob: truncated inside the header ({len(blob)} bytes, the header ends at {end})")
  header = json.loads(blob[PREFIX_BYTES:end])
  if not isinstance(header, dict):
    raise ValueError(f"blob: expected a JSON object as the header, got {type(header).__name__}")
  if header.get("format") != FORMAT_VERSION:
    raise ValueError(f"blob: expected format {FORMAT_VERSION}, got {header.get('format')}")
  return header, end


def read_header(blob: bytes) -> dict[str, Any]:
  """The JSON header of a file (its first bytes suffice; the checksum is not verified).

  header["streams"][component] = {raw, coded (bytes), coder, level} for masks, weights, m, v, other;
  header["meta"] is what the encoder's caller stored.
  """
  return _split_header(blob)[0]


def decode(blob: bytes, reference: Arrays | None) -> Checkpoint:
  """The checkpoint a file holds; `reference` is W_hat_{t-1} for a residual file (None for a keyframe).

  Raises ValueError for a file whose checksum fails (corrupt or truncated), or that needs a
  reference it was not given or was given another one than it was coded against.
  """
  if not isinstance(blob, (bytes, bytearray)):
    raise TypeError(f"blob: expected bytes (a file's contents), got {type(blob).__name__}")
  if not (reference is None or isinstance(reference, Mapping)):
    raise TypeError(f"reference: expected a name -> array mapping or None, got {type(reference).__name__}")
  if len(blob) < PREFIX_BYTES + _DIGEST or hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
    raise ValueError(f"blob: checksum mismatch, the file is corrupt or truncated ({len(blob)} bytes)")
  header, offset = _split_header(blob)
  raw = {}
  for component in COMPONENTS:
    stream = header["streams"][component]
    raw_size, coded_size = stream["raw"], stream["coded"]
    raw[component] = _decompress(blob[offset : offset + coded_size], stream["coder"], raw_size)
    offset += coded_size
    if len(raw[component]) != raw_size:
      raise ValueError(f"blob: the {component} stream holds {len(raw[component])} bytes, the header says {raw_size}")
  if header["reference"] is not None and (reference is None or fingerprint(reference) != header["reference"]):
    got = "none" if reference is None else fingerprint(reference)[:12]
    raise ValueError(
      f"reference: the file is a residual against the previous reconstruction, fingerprint "
      f"{header['reference'][:12]}; got {got}"
    )
  cursor = dict.fromkeys(COMPONENTS, 0)
  weights: dict[str, np.ndarray] = {}
  m: dict[str, np.ndarray] = {}
  v: dict[str, np.ndarray] = {}
  other: dict[str, np.ndarray] = {}
  for record in header["records"]:
    sections = []
    for component, size in zip(SECTION_COMPONENTS[record["kind"]], record["sizes"], strict=True):
      sections.append(raw[component][cursor[component] : cursor[component] + size])
      cursor[component] += size
    name, shape = record["name"], tuple(record["shape"])
    if record["kind"] == "other":
      other[name] = np.frombuffer(sections[0], record["dtypes"][0]).reshape(shape).copy()
    elif record["kind"] == "exact":
      weights[name], m[name], v[name] = (
        np.frombuffer(s, d).reshape(shape).copy() for s, d in zip(sections, record["dtypes"], strict=True)
      )
    else:
      assert reference is not None  # the fingerprint matched
      weights[name], m[name], v[name] = _decode_residual(sections, record, reference[name], header["config"]["bits"])
  for component in COMPONENTS:
    if cursor[component] != len(raw[component]):
      raise ValueError(
        f"blob: the records use {cursor[component]} bytes of the {component} stream of {len(raw[component])}"
      )
  return Checkpoint(weights, m, v, other)
