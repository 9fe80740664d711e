"""The disk-backed upstream-state cache: the same states as the upstream computes, read per clip, built once
and atomically, never reused when stale; bad and short clips skipped or fatal per data.on_error."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from speechclip.audio import AudioError
from speechclip.data import DataError, read_dataset
from speechclip.train.run import fit
from speechclip.train.state_cache import FRAME_MULTIPLE, build_state_cache, pad_states, upstream_states
from speechclip.upstream import SpeechUpstream
from tests.conftest import dead_pid, tiny_run_config


@pytest.fixture(scope="module")
def upstream(encoders) -> SpeechUpstream:
    return SpeechUpstream(encoders["hubert"]).eval()


@pytest.fixture(scope="module")
def clips(tiny_corpus) -> tuple[list, list[int]]:
    items = read_dataset("manifest", tiny_corpus, "val")
    return items, [soundfile.info(str(i.audio)).frames for i in items]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_store_holds_exactly_the_states_of_the_in_memory_path(upstream, clips, tmp_path, precision):
    items, lengths = clips
    bf16 = precision == "bf16-mixed"
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    store = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, autocast=autocast, precision=precision, progress=False)
    with autocast():
        expected = upstream_states(upstream, items, lengths, batch_size=4, progress=False)
    assert len(store) == len(items) and all(torch.equal(store.read(row), expected[row]) for row in range(len(items)))
    generator = torch.Generator().manual_seed(3)
    window = store.read(0, 7, generator)
    start = int(torch.randint(0, expected[0].shape[1] - 7 + 1, (1,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(window, expected[0][:, start : start + 7])  # a crop reads only its frames
    assert store.read(0, 7).equal(expected[0][:, :7])
    data = store.folder / "states.f16"
    assert data.stat().st_size == sum(s.numel() for s in expected) * 2  # fp16, nothing else


def test_built_once_reused_while_unchanged_rebuilt_when_stale(upstream, clips, tmp_path, monkeypatch):
    items, lengths = clips
    calls = []
    forward = SpeechUpstream.forward
    monkeypatch.setattr(SpeechUpstream, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    (tmp_path / "upstream_states").mkdir()
    (tmp_path / "upstream_states" / "leftover.tmp-999").mkdir()  # a build that was killed: never read
    first = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, progress=False)
    built = len(calls)
    assert built > 0
    again = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, progress=False)
    assert again.folder == first.folder and len(calls) == built  # reused: the upstream did not run
    os.utime(items[0].audio, ns=(1, 1))  # a clip changed on disk
    stale = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, progress=False)
    assert stale.folder != first.folder and len(calls) > built
    other = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, precision="bf16-mixed", progress=False)
    assert other.folder not in (first.folder, stale.folder)  # states of another precision are other states
    assert [p.name for p in (tmp_path / "upstream_states").glob("*.tmp-*")] == ["leftover.tmp-999"]  # ours all renamed


def test_a_build_removes_what_killed_builds_of_its_cache_left(upstream, clips, tmp_path):
    items, lengths = clips
    first = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, progress=False)
    shutil.rmtree(first.folder)
    killed = first.folder.with_name(f".{first.folder.name}.tmp-{dead_pid()}")
    running = first.folder.with_name(f".{first.folder.name}.tmp-{os.getppid()}")  # a live process: building now
    for folder in (killed, running):
        folder.mkdir()
        (folder / "states.f16").write_bytes(b"half")
    again = build_state_cache(upstream, items, lengths, tmp_path, batch_size=4, progress=False)
    assert again.folder == first.folder and not killed.exists() and running.exists()


def test_store_reads_from_dataloader_workers(upstream, clips, tmp_path):
    items, lengths = clips
    store = build_state_cache(upstream, items, lengths, tmp_path, progress=False)
    loader = torch.utils.data.DataLoader(range(len(items)), batch_size=4, num_workers=2, collate_fn=lambda rows: [store.read(r) for r in rows])
    assert all(torch.equal(a, store.read(i)) for i, a in enumerate(x for batch in loader for x in batch))


@pytest.fixture
def corpus_with_bad_clips(tiny_corpus, tmp_path) -> tuple[Path, Path, Path]:
    """The tiny corpus plus a NaN clip and a 10 ms clip in its training split."""
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("audio", "images"):
        (root / name).symlink_to(Path(tiny_corpus) / name)
    (root / "val.jsonl").write_text((Path(tiny_corpus) / "val.jsonl").read_text())
    lines = (Path(tiny_corpus) / "train.jsonl").read_text().splitlines()
    nan, short = tmp_path / "nan.wav", tmp_path / "short.wav"
    soundfile.write(str(nan), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    soundfile.write(str(short), np.random.default_rng(0).uniform(-0.5, 0.5, 160).astype(np.float32), 16000)
    for bad in (nan, short):
        record = json.loads(lines[0])
        record["audio"] = str(bad)
        lines.append(json.dumps(record))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, nan, short


def test_state_cache_path_skips_bad_and_short_clips_and_reports_them(encoders, corpus_with_bad_clips, tmp_path):
    root, nan, short = corpus_with_bad_clips
    config = tiny_run_config(encoders, str(root), str(tmp_path / "cache"), max_steps=2, cache_upstream_states=True)
    config.data.on_error = "skip"
    summary = fit(config, tmp_path / "run", progress=False)
    assert summary["global_step"] == 2
    skipped = json.loads((tmp_path / "run" / "train_summary.json").read_text())["skipped"]["train"]
    assert skipped["count"] == 2
    assert skipped["files"][str(nan)] == "audio contains NaN or infinite samples"
    assert skipped["files"][str(short)] == "shorter than the upstream's minimum (160 < 400 samples at 16 kHz)"
    assert skipped["reasons"] == {"audio contains NaN or infinite samples": 1, "shorter than the upstream's minimum": 1}


@pytest.mark.parametrize("cached", [True, False])
def test_bad_clips_stop_the_run_naming_them_with_on_error_raise(encoders, corpus_with_bad_clips, tmp_path, cached):
    root, nan, short = corpus_with_bad_clips
    config = tiny_run_config(encoders, str(root), str(tmp_path / "cache"), max_steps=2, cache_upstream_states=cached)
    with pytest.raises(DataError, match=rf"^{short}: shorter than the upstream's minimum \(160 < 400 samples at 16 kHz\); "
                                        "data.on_error=skip skips such clips$"):
        fit(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written: the run never started
    (root / "train.jsonl").write_text("".join(l + "\n" for l in (root / "train.jsonl").read_text().splitlines()[:-1]))
    if cached:  # the NaN clip is decoded while the cache is built, before training
        with pytest.raises(AudioError, match=rf"^{nan}: audio contains NaN or infinite samples$"):
            fit(config, tmp_path / "run", progress=False)
        assert not list((tmp_path / "cache" / "upstream_states").glob("*"))  # the failed build left nothing


def test_waveform_path_replaces_an_undecodable_clip_and_hands_the_skip_to_the_batch(corpus_with_bad_clips):
    from speechclip.train.datamodule import SpokenCaptionDataset, collate

    root, nan, _ = corpus_with_bad_clips
    items = [i for i in read_dataset("manifest", str(root), "train") if i.audio.name != "short.wav"]
    last = len(items) - 1  # the NaN clip: replaced by the next one (the first), reported with the batch
    dataset = SpokenCaptionDataset(items, list(range(len(items))), 16000, on_error="skip")
    item = dataset[(last, 5)]
    assert item["index"] == 0 and item["skipped"] == [(str(nan), "audio contains NaN or infinite samples")]
    assert item["wave"].numel() == 16000  # cropped by the seed's window
    assert torch.equal(dataset[(last, 5)]["wave"], item["wave"]) and not torch.equal(dataset[(last, 6)]["wave"], item["wave"])
    batch = collate([item, dataset[(1, None)]], torch.zeros(len(items), 4), None, None)
    assert batch["skipped"] == [(str(nan), "audio contains NaN or infinite samples")]
    with pytest.raises(AudioError, match=rf"^{nan}: audio contains NaN"):
        SpokenCaptionDataset(items, list(range(len(items))), 16000)[(last, 5)]


@pytest.mark.parametrize("variant", ["parallel", "cascaded", "hybrid", "cascaded_plus", "hybrid_plus"])
def test_batches_pad_to_a_multiple_of_eight_frames_which_every_head_masks_out(encoders, variant):
    """pad_states rounds a batch up to FRAME_MULTIPLE (for the heap, not the model): each clip's states are
    copied whole, the rest is zero and masked, and every head's output is that of the batch padded only to
    its longest clip (built here by hand)."""
    from speechclip import SpeechCLIP
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    model = SpeechCLIP(tiny_model_config(encoders, variant)).eval()
    num_states, width = model.upstream.num_hidden_states, model.upstream.hidden_size
    frames = [13, 5, 9]
    states = [torch.randn(num_states, t, width) for t in frames]
    padded, mask = pad_states(states)
    longest = -(-13 // FRAME_MULTIPLE) * FRAME_MULTIPLE
    assert longest > 13 and padded.shape == (num_states, 3, longest, width)  # frames beyond the longest clip
    assert mask.sum(1).tolist() == frames and all(bool(mask[i, :t].all()) for i, t in enumerate(frames))
    for row, (clip, t) in enumerate(zip(states, frames)):
        assert torch.equal(padded[:, row, :t], clip) and not padded[:, row, t:].any()
    exact = torch.zeros(num_states, 3, 13, width)
    for row, clip in enumerate(states):
        exact[:, row, : clip.shape[1]] = clip
    exact_mask = torch.arange(13)[None, :] < torch.tensor(frames)[:, None]
    with torch.no_grad():
        ours, reference = model.forward_states(padded, mask), model.forward_states(exact, exact_mask)
    torch.testing.assert_close(ours.embeds, reference.embeds, atol=1e-5, rtol=1e-5)
    if reference.cascaded is not None:  # keyword similarities too: a discrete pick hides small changes
        torch.testing.assert_close(ours.cascaded.similarity, reference.cascaded.similarity, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.cascaded.embeds, reference.cascaded.embeds, atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.cascaded.token_ids, reference.cascaded.token_ids)
        if reference.cascaded.lengths is not None:
            assert torch.equal(ours.cascaded.lengths, reference.cascaded.lengths)
