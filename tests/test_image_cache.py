"""The on-disk image-embedding cache: computed once, and consistent when processes share its folder."""

import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from speechclip.clip import FrozenCLIP
from speechclip.data import image_table, read_dataset
from speechclip.image_cache import ImageEmbeddingCache


def _images(corpus: str) -> list[str]:
    return [str(p) for p in image_table(read_dataset("manifest", corpus, "train")).paths]


def test_two_writers_leave_a_consistent_cache(encoders, tiny_corpus, tmp_path):
    clip = FrozenCLIP(encoders["clip"])
    paths = _images(tiny_corpus)[:8]
    first, second = ImageEmbeddingCache(tmp_path, clip), ImageEmbeddingCache(tmp_path, clip)  # both start empty
    a = first.embeddings(paths[:5])
    b = second.embeddings(paths[3:])  # the last writer wins, and its keys and rows travel together
    reread = ImageEmbeddingCache(tmp_path, clip)
    torch.testing.assert_close(reread.embeddings(paths[3:]), b)
    assert reread.images_embedded == 0
    torch.testing.assert_close(reread.embeddings(paths[:3]), a[:3])  # not in the last file: embedded again
    assert reread.images_embedded == 3
    assert sorted(p.name for p in reread.folder.iterdir()) == ["clip.txt", "embeddings.safetensors"]


def test_a_cache_without_keys_is_rebuilt(encoders, tiny_corpus, tmp_path):
    clip = FrozenCLIP(encoders["clip"])
    paths = _images(tiny_corpus)[:4]
    cache = ImageEmbeddingCache(tmp_path, clip)
    expected = cache.embeddings(paths)
    save_file({"embeddings": torch.zeros(4, clip.embed_dim)}, str(cache.folder / "embeddings.safetensors"))
    rebuilt = ImageEmbeddingCache(tmp_path, clip)
    torch.testing.assert_close(rebuilt.embeddings(paths), expected)
    assert rebuilt.images_embedded == 4


def test_a_damaged_cache_is_embedded_again(encoders, tiny_corpus, tmp_path):
    clip = FrozenCLIP(encoders["clip"])
    paths = _images(tiny_corpus)[:4]
    cache = ImageEmbeddingCache(tmp_path, clip)
    expected = cache.embeddings(paths)
    (cache.folder / "embeddings.safetensors").write_bytes(b"not a safetensors file")  # a disk error, say
    rebuilt = ImageEmbeddingCache(tmp_path, clip)
    torch.testing.assert_close(rebuilt.embeddings(paths), expected)
    assert rebuilt.images_embedded == 4


def test_a_clip_written_again_under_the_same_folder_gets_new_embeddings(encoders, tiny_corpus, tmp_path):
    """The demo pre-trains its mini CLIP again in place for another --seed: embeddings of the old weights must
    not be served for the new ones."""
    folder = tmp_path / "clip"
    shutil.copytree(encoders["clip"], folder)
    paths = _images(tiny_corpus)[:4]
    old = ImageEmbeddingCache(tmp_path / "cache", FrozenCLIP(str(folder))).embeddings(paths)
    torch.manual_seed(123)
    config = CLIPConfig.from_pretrained(folder)
    CLIPModel(config).save_pretrained(folder)
    clip = FrozenCLIP(str(folder))
    cache = ImageEmbeddingCache(tmp_path / "cache", clip)
    new = cache.embeddings(paths)
    reference = clip.model.get_image_features(
        pixel_values=clip.preprocess_images([Image.open(p) for p in paths])).pooler_output
    torch.testing.assert_close(new, reference)
    assert not torch.allclose(new, old)
    assert cache.images_embedded == 4


def test_two_spellings_of_one_clip_folder_share_the_cache(encoders, tiny_corpus, tmp_path, monkeypatch):
    paths = _images(tiny_corpus)[:4]
    ImageEmbeddingCache(tmp_path, FrozenCLIP(encoders["clip"])).embeddings(paths)
    monkeypatch.chdir(Path(encoders["clip"]).parent)
    other = ImageEmbeddingCache(tmp_path, FrozenCLIP(os.path.join(".", Path(encoders["clip"]).name, "")))
    other.embeddings(paths)
    assert other.images_embedded == 0
