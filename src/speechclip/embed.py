"""Embedding export at any size: each kind (speech, image, text) streams into shards on disk.

An output folder holds `<kind>-00000.safetensors`, `<kind>-00001.safetensors`, ... ("embeddings": (n, D)
float32, L2-normalised; the shard's ids, kind and number in the safetensors metadata) and `manifest.json`,
written last and atomically, listing every kind's shards. A shard is written under a temporary name and
renamed when whole, so a file with a shard's name is always complete: a rerun after an interruption skips
the shards whose ids are the ones it would write and does the rest. Every shard and the manifest record the
fingerprint of the model that wrote them, so a rerun with another checkpoint is refused instead of mixing
two models' embeddings in one folder. Memory holds one shard's embeddings and
one batch of inputs, whatever the collection size. Shard s of a kind holds items [s * shard_size, (s + 1) *
shard_size) of that kind, so any process (or GPU rank, `train/embed_job.py`) can write any shard.

The earlier single-file format (`<kind>.safetensors` + `<kind>.ids.json`) is still read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import soundfile
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .audio import pad_batch
from .data.items import SpokenCaption, distinct_images
from .file_modes import follow_umask
from .fingerprint import model_fingerprint
from .images import load_image
from .model import SpeechCLIP

KINDS = ("speech", "image", "text")
# oneDNN keeps a compiled kernel per input shape (up to 1,024 by default), each with its buffers: over
# length-sorted batches of clips, every batch is a new shape, and the mini HuBERT's RSS grew 415 -> 1,058 MB in
# 60 batches (benchmarks/embed_throughput.py --stream). 16 keep the reuse of fixed shapes (images, texts).
KERNEL_CACHE = "16"
SHARD_SIZE = 10_000  # 20 MB of 512-d float32 per shard
MANIFEST = "manifest.json"
FORMAT = "speechclip-embeddings/1"


@dataclass
class Collection:
    """One kind's inputs in export order: `ids[i]` names the embedding of `inputs[i]`."""

    kind: str
    ids: list[str]
    inputs: list  # audio paths, image paths or texts

    def shards(self, shard_size: int) -> list[tuple[int, int]]:
        return [(start, min(start + shard_size, len(self.ids))) for start in range(0, len(self.ids), shard_size)]


def collections(items: Sequence[SpokenCaption], what: Sequence[str]) -> list[Collection]:
    """speech: one per clip (id: the audio path); image: one per distinct image_id; text: one per clip with a
    transcript (id: the audio path, so speech and text rows pair up)."""
    unknown = set(what) - set(KINDS)
    if unknown:
        raise ValueError(f"--what: unknown kind(s) {sorted(unknown)}; choose from {KINDS}")
    result = []
    if "speech" in what:
        result.append(Collection("speech", [str(i.audio) for i in items], [i.audio for i in items]))
    if "image" in what:
        images = distinct_images(items)
        result.append(Collection("image", list(images), list(images.values())))
    if "text" in what:
        texts = [i for i in items if i.text]
        result.append(Collection("text", [str(i.audio) for i in texts], [i.text for i in texts]))
    return result


def check_export(out: Path, todo: Sequence[Collection], batch_size: int, shard_size: int) -> None:
    """Refuse, before any work, what would fail part way or write a folder with nothing in it."""
    for name, value in (("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: a file, not a folder")
    if not any(collection.ids for collection in todo):  # a kind alone may be empty: text, without transcripts
        raise ValueError(f"no items to embed as {', '.join(c.kind for c in todo)} (an empty manifest or split?)")


def shard_path(out: Path, kind: str, number: int) -> Path:
    return Path(out) / f"{kind}-{number:05d}.safetensors"


# ---- one batch: prepared (CPU, a DataLoader worker can do it) then encoded (the model's device) ---------------
def prepare_batch(model: SpeechCLIP, kind: str, inputs: Sequence) -> dict[str, torch.Tensor]:
    """Read and pad a batch: waveforms, image pixels or text tokens."""
    if kind == "speech":
        waves, lengths = pad_batch([model.waveform(a, i) for i, a in enumerate(inputs)])
        return {"waves": waves, "lengths": lengths}
    if kind == "image":
        return {"pixels": model.clip.preprocess_images([load_image(p) for p in inputs])}
    return dict(model.clip.tokenize(list(inputs)))


@torch.no_grad()
def encode_prepared(model: SpeechCLIP, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D) L2-normalised float32 embeddings on the CPU; speech takes `encode_speech`'s default branch."""
    if kind == "speech":
        embeds = model(batch["waves"].to(model.device), batch["lengths"].to(model.device)).embeds
    elif kind == "image":
        embeds = model.clip.image_features(batch["pixels"])
    else:
        embeds = model.clip.text_features(batch["input_ids"], batch["attention_mask"])
    return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()


def bound_kernel_cache() -> None:
    """Cap oneDNN's kernel cache (unless the user set it). Read when the process runs its first convolution,
    so it only takes effect in a process that has not run one yet (`speechclip embed` / `eval`)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE)


def clip_seconds(audio) -> float:
    """A clip's duration from its file header (0 for in-memory audio or an unreadable file, whose loading
    then raises the error that names it)."""
    if not isinstance(audio, (str, Path)):
        return 0.0
    try:
        return soundfile.info(str(audio)).duration
    except (RuntimeError, soundfile.LibsndfileError):
        return 0.0


def batches(collection: Collection, start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Rows of one shard in batches; speech shortest first (headers only), so a batch pads little."""
    rows = list(range(start, stop))
    if collection.kind == "speech":
        rows.sort(key=lambda row: clip_seconds(collection.inputs[row]))
    return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


# ---- shards and manifest ---------------------------------------------------------------------------------
def write_shard(path: Path, embeddings: torch.Tensor, ids: Sequence[str], meta: dict) -> Path:
    """Write under a temporary name, then rename: a shard file is never seen half-written."""
    if len(ids) != len(embeddings):
        raise ValueError(f"{path}: {len(ids)} ids for {len(embeddings)} embeddings")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    metadata = {"ids": json.dumps(list(ids)), **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}}
    save_file({"embeddings": embeddings.float().contiguous()}, str(tmp), metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)
    return path


def embed_meta(model: SpeechCLIP) -> dict:
    """What every shard and the manifest record of the model that wrote them."""
    return {"upstream": model.config.upstream, "clip": model.config.clip, "model": model_fingerprint(model),
            "encoders": model.encoder_fingerprints()}


def check_folder_model(out: Path, meta: dict) -> None:
    """Refuse, before any work, a folder whose manifest lists another model's embeddings."""
    path = Path(out) / MANIFEST
    if meta.get("model") and path.is_file():
        written = read_manifest(out).get("model", {}).get("model")
        if written != meta["model"]:
            raise ValueError(_other_model(path, written, meta["model"]))


def finished_shards(out: Path, todo: Sequence[Collection], shard_size: int, meta: dict) -> set[tuple[str, int]]:
    """(kind, number) of every shard of `todo` already written by this model (`meta`, from `embed_meta`); an
    error naming the manifest or the first shard that holds other ids or another model's embeddings. Checked
    before any work, on every rank alike, so a refusal is one line everywhere instead of one rank failing
    inside a distributed job. Reads each shard's header (its ids: about 0.6 MB of JSON per 10,000), once per
    process."""
    check_folder_model(out, meta)
    model = meta.get("model")
    done = set()
    for collection in todo:
        for number, (start, stop) in enumerate(collection.shards(shard_size)):
            if shard_is_done(shard_path(Path(out), collection.kind, number), collection.ids[start:stop], model):
                done.add((collection.kind, number))
    return done


def shard_is_done(path: Path, ids: Sequence[str], model: str | None = None) -> bool:
    """True when `path` holds these ids (embedded by `model`, a fingerprint, when given); an error when it
    holds others (another input or shard size) or another model's."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        written = json.loads(metadata.get("ids", "null"))
    except (OSError, ValueError, SafetensorError) as error:  # not a shard we wrote (renames make torn files impossible)
        raise ValueError(f"{path}: unreadable shard ({error}); delete it to embed it again") from error
    if written != list(ids):
        raise ValueError(f"{path}: holds other items than this run's shard (another manifest or --shard-size); "
                         "use another --out or delete the folder")
    if model is not None and metadata.get("model") != model:
        raise ValueError(_other_model(path, metadata.get("model"), model))
    return True


def _other_model(path: Path, written: str | None, model: str) -> str:
    """The refusal of a folder or shard that another model wrote, or that predates model fingerprints."""
    if not written:
        return (f"{path}: written before embeddings recorded the model that made them, so it cannot be told "
                "whether this model did; use another --out or delete the folder to embed again")
    return (f"{path}: holds the embeddings of another model (fingerprint {written[:12]}; this one is "
            f"{model[:12]}); use another --out or delete the folder")


def write_manifest(out: Path, done: Sequence[Collection], shard_size: int, meta: dict) -> Path:
    """After every shard of `done` exists: list them in manifest.json (atomically), keeping other kinds
    an earlier run wrote into the same folder."""
    out = Path(out)
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else {"format": FORMAT, "kinds": {}}
    manifest.update({"format": FORMAT, "model": meta, "shard_size": shard_size})
    for collection in done:
        shards = []
        for number, (start, stop) in enumerate(collection.shards(shard_size)):
            path = shard_path(out, collection.kind, number)
            if not shard_is_done(path, collection.ids[start:stop], meta.get("model")):
                raise FileNotFoundError(f"{path}: missing; run `speechclip embed` again to finish it")
            shards.append({"file": path.name, "count": stop - start})
        dim = _shard_dim(out / shards[0]["file"]) if shards else 0
        manifest["kinds"][collection.kind] = {"count": len(collection.ids), "dim": dim, "shards": shards}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def _shard_dim(path: Path) -> int:
    with safe_open(str(path), framework="pt") as file:
        return int(file.get_slice("embeddings").get_shape()[1])


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; `speechclip embed` writes it when every shard is done")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:  # written atomically by us, so another program's file or a damaged disk
        raise ValueError(f"{path}: not a manifest of `speechclip embed` ({error}); delete the folder to embed again") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: holds a JSON {type(manifest).__name__}, not a manifest of `speechclip embed`")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ---- the single-process export ---------------------------------------------------------------------------
def embed_collection(model: SpeechCLIP, items: Sequence[SpokenCaption], out: Path, what: Sequence[str] = KINDS,
                     batch_size: int = 32, shard_size: int = SHARD_SIZE, progress: bool = False) -> Path:
    """Embed every kind in `what` into shards under `out`, skipping finished shards; returns manifest.json."""
    bound_kernel_cache()
    model.eval()
    meta = embed_meta(model)
    todo = collections(items, what)
    check_export(out, todo, batch_size, shard_size)
    done = finished_shards(out, todo, shard_size, meta)
    for collection in todo:
        for number, (start, stop) in enumerate(tqdm(collection.shards(shard_size), desc=f"{collection.kind} shards", disable=not progress)):
            if (collection.kind, number) in done:
                continue
            embeddings = None
            for rows in batches(collection, start, stop, batch_size):
                batch = encode_prepared(model, collection.kind, prepare_batch(model, collection.kind, [collection.inputs[r] for r in rows]))
                if embeddings is None:
                    embeddings = torch.empty(stop - start, batch.shape[1])
                embeddings[torch.tensor(rows) - start] = batch
            write_shard(shard_path(out, collection.kind, number), embeddings, collection.ids[start:stop],
                        {**meta, "kind": collection.kind, "shard": number})
    return write_manifest(out, todo, shard_size, meta)


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class EmbeddingSource:
    """One kind's embeddings on disk: a manifest's shards, or one file of the earlier format."""

    files: list[Path]
    counts: list[int]  # rows per file
    dim: int
    legacy: bool = False
    kind: str | None = None  # what each shard's metadata must say it holds (None: the earlier format)
    made_by: dict = field(default_factory=dict)  # the manifest's record of the model that wrote them (embed_meta)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def rows(self) -> "ShardRows":
        """Random access to single rows, memory-mapped (an index's exact re-ranking reads them)."""
        return ShardRows(self.files, self.counts)

    def chunks(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(n, D) embeddings and their ids, one shard at a time."""
        for number, path in enumerate(self.files):
            if self.legacy:
                yield load_embeddings(path)
                continue
            yield self._read_shard(number, path)

    def _read_shard(self, number: int, path: Path) -> tuple[torch.Tensor, list[str]]:
        """One shard, checked against the manifest: the kind, number and rows it lists for this file (a shard
        copied under another name, or cut short, is named instead of indexed)."""
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                vectors = file.get_tensor("embeddings")
            ids = json.loads(metadata["ids"])
        except (OSError, ValueError, KeyError, SafetensorError) as error:
            raise ValueError(f"{path}: unreadable shard ({error}); run `speechclip embed` again to rewrite it") from error
        said = (metadata.get("kind"), metadata.get("shard"))
        if said != (self.kind, str(number)) or not len(ids) == len(vectors) == self.counts[number] or tuple(vectors.shape[1:]) != (self.dim,):
            raise ValueError(f"{path}: holds {tuple(vectors.shape)} {said[0]} embeddings of shard {said[1]}, where the "
                             f"manifest lists {self.counts[number]} x {self.dim} {self.kind} of shard {number}; "
                             "run `speechclip embed` again into an empty folder")
        return vectors, ids

    def id_chars(self) -> int:
        """Mean id length in the first chunk (for the index's memory estimate)."""
        for _, ids in self.chunks():
            return round(sum(map(len, ids)) / max(1, len(ids)))
        return 0


def embedding_source(path: Path, what: str | None = None) -> EmbeddingSource:
    """A folder written by `speechclip embed` (with `what` when it holds several kinds) or an earlier
    `<kind>.safetensors` file."""
    path = Path(path)
    if path.is_file():
        vectors, _ = load_embeddings(path)
        return EmbeddingSource([path], [len(vectors)], vectors.shape[1], legacy=True)
    manifest = read_manifest(path)
    kinds = manifest.get("kinds")
    if not isinstance(kinds, dict):
        raise ValueError(f"{path / MANIFEST}: no 'kinds' (not a finished `speechclip embed` folder)")
    if what is None and len(kinds) == 1:
        what = next(iter(kinds))
    if what not in kinds:
        raise ValueError(f"{path / MANIFEST}: choose --what from {sorted(kinds)}" + (f" (no {what!r})" if what else ""))
    try:
        entry = kinds[what]
        files, counts, dim = [path / s["file"] for s in entry["shards"]], [int(s["count"]) for s in entry["shards"]], int(entry["dim"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / MANIFEST}: kinds.{what} lacks or misstates {error} (not a finished `speechclip embed` folder)") from None
    if not counts and not entry.get("count"):
        raise ValueError(f"{path / MANIFEST}: no {what} embeddings in this folder (its manifest or split had none)")
    if sum(counts) != entry.get("count", sum(counts)) or not counts:
        raise ValueError(f"{path / MANIFEST}: kinds.{what} lists {sum(counts)} rows in {len(counts)} shards for a count of {entry.get('count')}")
    return EmbeddingSource(files, counts, dim, kind=what, made_by=manifest.get("model") or {})


class ShardRows:
    """Rows of one kind's embeddings read on demand from memory-mapped shard files: the collection stays on
    disk (the page cache keeps what is read often), never a copy in the process."""

    def __init__(self, files: Sequence[Path], counts: Sequence[int]):
        self.files, self.starts = list(files), np.cumsum([0, *counts])
        self.maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """(n,) global row numbers -> (n, D) float32 vectors."""
        rows = np.asarray(rows, dtype=np.int64)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = None
        for number in np.unique(shard):
            chosen = np.nonzero(shard == number)[0]
            block = self._map(int(number))[rows[chosen] - self.starts[number]]
            if out is None:
                out = np.empty((len(rows), block.shape[1]), np.float32)
            out[chosen] = block
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _map(self, number: int) -> np.ndarray:
        if number not in self.maps:
            self.maps[number] = _memmap_embeddings(self.files[number])
        return self.maps[number]


def _memmap_embeddings(path: Path) -> np.ndarray:
    """The "embeddings" tensor of a safetensors file as a read-only memory map (the format is an 8-byte
    header length, a JSON header with dtype, shape and byte offsets, then the raw data)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    entry = header.get("embeddings")
    if not entry or entry.get("dtype") != "F32" or len(entry.get("shape", [])) != 2:
        raise ValueError(f"{path}: expected an F32 (n, D) tensor named 'embeddings', found {entry}")
    begin, _ = entry["data_offsets"]
    return np.memmap(path, dtype=np.float32, mode="r", offset=8 + size + begin, shape=tuple(entry["shape"]))


def load_embeddings(path: Path, what: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """All of one kind in memory: from an earlier `<kind>.safetensors` (+ `<kind>.ids.json`) or a folder
    of shards. For collections larger than memory, iterate `embedding_source(...).chunks()` instead."""
    path = Path(path)
    if path.is_dir():
        parts = list(embedding_source(path, what).chunks())
        return torch.cat([p[0] for p in parts]), [i for p in parts for i in p[1]]
    ids_path = path.with_suffix(".ids.json")
    if not path.is_file() or not ids_path.is_file():
        raise FileNotFoundError(f"{path}: expected an embeddings .safetensors with {ids_path.name} beside it, or a folder with {MANIFEST}")
    return load_file(str(path))["embeddings"], json.loads(ids_path.read_text())
