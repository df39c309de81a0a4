"""Byte-level data: tokenizer, a real-text corpus found on every machine, packed batches.

Default corpus: the Python standard library's own source files (`*.py` under
`sysconfig.get_paths()["stdlib"]`, leaving out `site-packages` and the `test`,
`tests` and `idlelib` folders): about 10 MB of real text with no download. Files are
sorted by relative path and joined with a blank line; a file goes to validation iff
crc32(relative path) % 10 == 0 (about 10%), so the split is deterministic and the
same on every machine with the same Python version (3.12.1 here; the GPU image's
3.12.3 differs slightly). `path=` accepts a text file (its last 10% of bytes are
validation) or a directory (its files split by the same crc32 rule).

Batches are fixed-length windows of `seq_len + 1` bytes cut back to back from the
concatenated stream (packed: a window may span documents). Batch `step` is a pure
function of (seed, step): each epoch visits the windows in a seeded permutation.
That makes resuming exact: restoring the step restores the data position.
"""

import dataclasses
import pathlib
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as token ids -> [N] uint8."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(ids) -> str:
  """Token ids (any int array) -> text; invalid UTF-8 is replaced, never raised."""
  return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Split:
  """A byte stream and where each document starts in it."""

  tokens: np.ndarray      # [N] uint8
  doc_starts: np.ndarray  # [num_docs] int64, sorted, doc_starts[0] == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: Split
  val: Split
  description: str


def _join(texts: list[bytes]) -> Split:
  starts, parts, offset = [], [], 0
  for t in texts:
    starts.append(offset)
    parts.append(t + b"\n\n")
    offset += len(t) + 2
  tokens = np.frombuffer(b"".join(parts), dtype=np.uint8)
  return Split(tokens, np.asarray(starts, dtype=np.int64))


def _is_val(relative_path: str) -> bool:
  return zlib.crc32(relative_path.encode()) % 10 == 0


def _directory_files(root: pathlib.Path, glob: str) -> list[pathlib.Path]:
  files = [p for p in root.rglob(glob) if p.is_file()
           and not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(path: str | None = None, glob: str = "*.py", max_bytes: int | None = None) -> Corpus:
  """The training corpus (see the module docstring).

  Args:
    path: None for the standard library's sources, else a text file or a directory.
    glob: file pattern inside a directory.
    max_bytes: keep at most this many training bytes (validation keeps a tenth).
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"] if path is None else path).expanduser()
  if not root.exists():
    raise ValueError(f"data.path={path!r} does not exist")
  if root.is_file():
    data = root.read_bytes()
    cut = int(len(data) * 0.9)
    train, val = _join([data[:cut]]), _join([data[cut:]])
  else:
    files = _directory_files(root, glob)
    if not files:
      raise ValueError(f"no files matching {glob!r} under data.path={str(root)!r}")
    rel = [p.relative_to(root).as_posix() for p in files]
    train = _join([p.read_bytes() for p, r in zip(files, rel) if not _is_val(r)])
    val = _join([p.read_bytes() for p, r in zip(files, rel) if _is_val(r)])
  if max_bytes is not None:
    train = _truncate(train, max_bytes)
    val = _truncate(val, max(max_bytes // 10, 1))
  description = "python-stdlib" if path is None else str(root)
  return Corpus(train, val, f"{description}: {len(train.tokens):,} train / {len(val.tokens):,} val bytes")


def _truncate(split: Split, max_bytes: int) -> Split:
  return Split(split.tokens[:max_bytes], split.doc_starts[split.doc_starts < max_bytes])


def num_windows(split: Split, seq_len: int) -> int:
  return len(split.tokens) // (seq_len + 1)


def _window_batch(split: Split, window_ids: np.ndarray, seq_len: int) -> dict:
  """Windows by index -> inputs/targets [B, L] int32, segment_ids and positions [B, L].

  segment_ids number the documents inside each window (0, 1, ...); positions restart
  at 0 at each document start, so packed documents can be kept apart when wanted.
  """
  starts = window_ids * (seq_len + 1)
  idx = starts[:, None] + np.arange(seq_len + 1)
  tokens = split.tokens[idx].astype(np.int32)
  # Index of the document each byte belongs to, relative to the window's first one.
  doc = np.searchsorted(split.doc_starts, idx[:, :-1], side="right") - 1
  segment_ids = (doc - doc[:, :1]).astype(np.int32)
  doc_start = np.maximum(split.doc_starts[doc], starts[:, None])
  positions = (idx[:, :-1] - doc_start).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": segment_ids, "positions": positions}


def train_batch(split: Split, step: int, *, batch_size: int, seq_len: int, seed: int) -> dict:
  """Batch number `step` (0-based): a pure function of (split, step, sizes, seed)."""
  n = num_windows(split, seq_len)
  if n < batch_size:
    raise ValueError(f"corpus has {n} windows of seq_len+1={seq_len + 1} bytes, "
                     f"fewer than batch_size={batch_size}")
  sample = step * batch_size + np.arange(batch_size)
  epochs, within = np.divmod(sample, n)
  window_ids = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
    window_ids[epochs == epoch] = perm[within[epochs == epoch]]
  return _window_batch(split, window_ids, seq_len)


def eval_batches(split: Split, *, num_batches: int, batch_size: int, seq_len: int) -> list[dict]:
  """The first num_batches * batch_size windows of a split, in order (a fixed eval set)."""
  n = num_windows(split, seq_len)
  if n < batch_size:
    raise ValueError(f"validation split has {n} windows of {seq_len + 1} bytes, fewer than "
                     f"batch_size={batch_size}; use a larger corpus or smaller data.seq_len")
  num_batches = min(num_batches, n // batch_size)
  ids = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  return [_window_batch(split, row, seq_len) for row in ids]
