"""The on-disk image-embedding cache: computed once, and consistent when processes share its folder."""

import torch
from safetensors.torch import save_file

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
