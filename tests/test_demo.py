"""`speechclip demo --quick`: every stage runs and every metric and picture is there (toy scale; the
full-size figures are in the README with the command that reproduces them)."""

import json
import math

import pytest

from speechclip.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys, monkeypatch):
    main(["demo", "--quick", "--plus", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stage_seconds"]
    assert [s.split(".")[0] for s in stages] == ["1", "2", "3", "4"]
    jobs = results["jobs"]  # stage 2's jobs, the control beside the mini HuBERT, the pretrained run after both
    assert set(jobs) == {"mini CLIP", "mini HuBERT", "random", "pretrained", "plus"}
    assert jobs["random"]["start"] >= jobs["mini CLIP"]["end"]
    assert jobs["pretrained"]["start"] >= max(jobs["random"]["end"], jobs["mini HuBERT"]["end"])
    assert jobs["plus"]["start"] >= jobs["pretrained"]["end"] and jobs["pretrained"]["threads"] == jobs["plus"]["threads"]
    assert "stage 2's jobs" in printed
    for name in ("pretrained", "random", "plus"):
        for branch in ("parallel", "cascaded"):
            for task in ("speech_to_image", "image_to_speech", "speech_to_text", "text_to_speech"):
                recall, chance = results[name][branch][task]["recall"], results[name][branch][task]["chance"]
                assert recall["1"] <= recall["5"] <= recall.get("10", 1.0)
                assert 0 < chance["1"] <= chance["5"] <= chance.get("10", 1.0)
        images = results[name]["images"]
        assert results[name]["parallel"]["speech_to_image"]["chance"]["1"] == pytest.approx(1 / images)
    _check_keywords(tmp_path, results)
    folds = results["test_folds"]  # the check's ratio pools the table's split and the extra fold
    assert folds["folds"] == 2 and folds["speech_to_image_r1"][0] == results["pretrained"]["parallel"]["speech_to_image"]["recall"]["1"]
    assert folds["ratio"] == pytest.approx(sum(folds["speech_to_image_r1"]) / sum(folds["ceiling_r1"]))
    assert "over 2 test folds" in printed and "per fold:" in printed
    hubert = results["pretraining"]["hubert"]  # masked prediction starts near a uniform guess over the clusters
    assert abs(hubert["loss_first"] - math.log(1 / hubert["chance_accuracy"])) < 1.0
    peaks = results["stage_peak_memory_mib"]  # the whole tree: torch alone is over 100 MiB
    assert list(peaks) == list(stages) and all(100 < peaks[s] <= results["peak_memory_mib"] for s in stages)
    for picture in ("training_curves.png", "retrieval_grid.png", "keywords.png"):
        assert (tmp_path / "pictures" / picture).stat().st_size > 1000
    assert "mini CLIP text -> image" in printed and "zero-shot" in printed and "random upstream" in printed
    assert "SpeechCLIP+" in printed and "keywords per utterance" in printed and "peak memory" in printed
    # the control trains fewer steps; both runs' validation at its last step is in the table
    assert results["training"]["random"]["global_step"] == 2 and results["training"]["pretrained"]["global_step"] == 4
    same_step = results["control_step"]
    assert same_step["step"] == 2 and set(same_step["speech_to_image_r1"]) == {"pretrained", "random"}
    assert "control: random upstream (2 steps)" in printed and "(after 4 vs 2 steps)" in printed
    assert f"at the same step (2), validation split: {100 * same_step['speech_to_image_r1']['pretrained']:.1f}" in printed
    # a second run reuses the corpus and both encoders
    main(["demo", "--quick", "--out", str(tmp_path)])
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["pretraining"]["clip"]["reused"] and again["pretraining"]["hubert"]["reused"]
    assert again["training"]["pretrained"]["reused"] and again["training"]["random"]["reused"]
    caches = tmp_path / "cache" / "upstream_states"
    before = {folder.name for folder in caches.iterdir()}
    main(["demo", "--quick", "--retrain", "--out", str(tmp_path)])
    retrained = json.loads((tmp_path / "results.json").read_text())
    assert retrained["pretraining"]["hubert"]["reused"] and not retrained["training"]["pretrained"]["reused"]
    assert {folder.name for folder in caches.iterdir()} == before  # both upstreams' state caches reused, none added
    # another seed: every training run is drawn again (the encoders too), on the same corpus, and the state
    # caches of the replaced upstreams go (each 1.1 GiB at full size): what is left is this build's own; in fp32
    # (--fp32), as on a CPU without bf16 units
    capsys.readouterr()
    main(["demo", "--quick", "--seed", "1", "--fp32", "--out", str(tmp_path)])
    assert "computed in fp32" in capsys.readouterr().out
    after = {folder.name for folder in caches.iterdir()}
    assert after and not before & after
    reseeded = json.loads((tmp_path / "results.json").read_text())
    assert not reseeded["pretraining"]["hubert"]["reused"] and not reseeded["pretraining"]["clip"]["reused"]
    assert reseeded["pretraining"]["hubert"]["spec"]["seed"] == retrained["pretraining"]["hubert"]["spec"]["seed"] + 1
    assert not reseeded["training"]["pretrained"]["reused"]
    assert reseeded["corpus"] == retrained["corpus"]
    assert reseeded["arithmetic"] == "fp32" and not reseeded["pretraining"]["hubert"]["spec"]["bf16"]
    for name in ("pretrained", "random"):
        assert json.loads((tmp_path / "runs" / name / "demo_run.json").read_text())["config"]["train"]["precision"] == "32-true"
    _released_encoders_are_taken_instead_of_pre_training(tmp_path, monkeypatch)


def _released_encoders_are_taken_instead_of_pre_training(build, monkeypatch):
    """These encoders released (as the package ships the full build's, `demo/released.py`): a new folder takes them,
    byte for byte, and trains the control on every thread after the pretrained run; --pretrain builds its own."""
    import shutil

    from speechclip.demo import released

    release = build / "release"
    for name in ("clip", "hubert"):
        shutil.copytree(build / "encoders" / name, release / name)
        log = json.loads((release / name / "pretrain.json").read_text())
        (release / name / "pretrain.json").write_text(json.dumps({**log, "released": {"by": "this test"}}))
    monkeypatch.setattr(released, "RELEASED", release)
    out = build / "second"
    main(["demo", "--quick", "--seed", "1", "--out", str(out)])  # the release's recipe, but bf16 where the CPU has it
    results = json.loads((out / "results.json").read_text())
    assert set(results["jobs"]) == {"pretrained", "random"}
    assert results["jobs"]["random"]["start"] >= results["jobs"]["pretrained"]["end"]
    assert results["jobs"]["random"]["threads"] == results["jobs"]["pretrained"]["threads"]
    for name in ("clip", "hubert"):
        assert results["pretraining"][name]["released"] == {"by": "this test"}
        for file in (release / name).iterdir():
            assert (out / "encoders" / name / file.name).read_bytes() == file.read_bytes(), file
    main(["demo", "--quick", "--seed", "1", "--pretrain", "--out", str(out)])
    rebuilt = json.loads((out / "results.json").read_text())
    assert {"mini CLIP", "mini HuBERT"} <= set(rebuilt["jobs"]) and "released" not in rebuilt["pretraining"]["hubert"]


def _check_keywords(out, results: dict) -> None:
    """Keywords name subwords of the quantizer's vocabulary (never BOS/EOS/padding), K of them for hybrid and
    a variable number (slot p+1 reached by no more utterances than slot p) for hybrid_plus."""
    from speechclip.model import SpeechCLIP

    for name, fixed in (("pretrained", 2), ("plus", None)):
        model = SpeechCLIP.from_pretrained(out / "runs" / name / "final")
        allowed = {model.subword(int(t)) for t in model.head.keywords.quantizer.vocab_ids}
        kw = results[name]["keywords"]
        for example in kw["examples"]:
            assert fixed is None or len(example["keywords"]) == fixed
            assert all(len(slot) == 5 and set(slot) <= allowed for slot in example["keywords"])
        counts = kw["per_keyword_count"]
        assert kw["mean_keywords"] == pytest.approx(sum(counts) / kw["utterances"])
        assert kw["hit_rate"] == pytest.approx(sum(h * c for h, c in zip(kw["per_keyword"], counts)) / sum(counts))
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        if fixed:
            assert counts == [kw["utterances"]] * fixed


def test_jobs_run_after_what_they_need_on_their_share_of_the_threads(monkeypatch, capsys):
    """Two one-thread lanes on two threads: a job starts once the jobs it needs are done, a whole-machine job
    runs alone on every thread, and a failure is reported, skips what needs it, and lets the rest go on."""
    import os
    import time

    import torch

    from speechclip.demo.schedule import Job, run_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine the jobs would run in process

    schedule = run_jobs([Job("slow", time.sleep, (1.0,)),
                         Job("beside", torch.get_num_threads),
                         Job("broken", os.stat, ("/no-such-file",)),
                         Job("needs broken", torch.get_num_threads, after=("broken",)),
                         Job("after slow", torch.get_num_threads, after=("slow",)),
                         Job("alone", torch.get_num_threads, after=("slow",), whole_machine=True)], threads=2)
    assert schedule.results["beside"] == 1 and schedule.results["after slow"] == 1
    assert schedule.results["alone"] == 2 and schedule.threads["alone"] == 2
    assert schedule.spans["after slow"][0] >= schedule.spans["slow"][1]
    assert schedule.spans["beside"][0] < schedule.spans["slow"][1]  # the two lanes really run side by side
    alone = schedule.spans["alone"]
    assert all(end <= alone[0] or start >= alone[1] for name, (start, end) in schedule.spans.items() if name != "alone")
    assert set(schedule.failures) == {"broken", "needs broken"} and "needs broken" not in schedule.spans
    printed = capsys.readouterr().out
    assert "[demo] broken: failed: FileNotFoundError" in printed and "needs broken: not run, since broken failed" in printed
    with pytest.raises(FileNotFoundError):
        schedule.raise_first_failure()
    with pytest.raises(ValueError, match="'early'.*'late'"):  # a job may only wait on jobs listed before it
        run_jobs([Job("early", time.sleep, (0,), after=("late",)), Job("late", time.sleep, (0,))], threads=2)


def test_a_worker_that_dies_is_named_and_stops_what_has_not_started(capsys):
    """A worker killed (the kernel's out-of-memory killer, here SIGABRT) breaks the pool: the job is named,
    and the jobs not yet started are skipped with the reason instead of failing on a broken pool."""
    import os

    from speechclip.demo.schedule import Job, run_jobs

    schedule = run_jobs([Job("dies", os.abort, whole_machine=True), Job("next", os.getpid)], threads=2)
    assert set(schedule.failures) == {"dies", "next"} and not schedule.results
    printed = capsys.readouterr().out
    assert "dies: stopped, since a worker process died" in printed and "next: not run, since a worker process died" in printed


def test_jobs_run_one_after_the_other_on_one_thread(monkeypatch, capsys):
    import os

    import torch

    from speechclip.demo.schedule import Job, run_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    schedule = run_jobs([Job("broken", os.stat, ("/no-such-file",)), Job("needs broken", os.getpid, after=("broken",)),
                         Job("pid", os.getpid), Job("threads", torch.get_num_threads, after=("pid",))], threads=1)
    assert schedule.results == {"pid": os.getpid(), "threads": torch.get_num_threads()}  # in this process
    assert set(schedule.failures) == {"broken", "needs broken"}
    assert "needs broken: not run, since broken failed" in capsys.readouterr().out


def test_stage_two_gives_jobs_only_to_what_is_not_finished(monkeypatch, tmp_path):
    """What `_jobs` schedules: everything on a first build; nothing already finished (a pre-training of the same
    spec, a run of the same configuration), and no wait on it; with --retrain every SpeechCLIP run again."""
    import speechclip.demo.run as demo_run
    from speechclip.demo.spec import DemoSpec

    spec = DemoSpec.quick()
    finished_encoders, finished_runs = set(), set()
    monkeypatch.setattr(demo_run, "finished_pretraining", lambda folder, s, released=True: {"spec": {}} if folder.name in finished_encoders else None)
    monkeypatch.setattr(demo_run, "finished_run", lambda values, encoders, run_dir: {"global_step": 1} if run_dir.name in finished_runs else None)
    monkeypatch.setattr(demo_run, "runs_in_workers", lambda threads: True)

    def plan(retrain=False, plus=True):
        jobs, done = demo_run._jobs(tmp_path, spec, tmp_path / "corpus", [], retrain, plus)
        return {job.name: (job.after, job.whole_machine) for job in jobs}, set(done)

    jobs, done = plan()
    assert jobs == {"mini CLIP": ((), False), "mini HuBERT": ((), False), "random": (("mini CLIP",), False),
                    "pretrained": (("mini CLIP", "mini HuBERT"), True), "plus": (("mini CLIP", "mini HuBERT", "pretrained"), True)}
    assert not done
    finished_encoders.update({"clip", "hubert"})
    finished_runs.update({"pretrained", "random"})
    jobs, done = plan()
    assert jobs == {"plus": ((), True)} and done == {"mini CLIP", "mini HuBERT", "pretrained", "random"}
    jobs, done = plan(retrain=True, plus=False)
    # nothing to pre-train beside it: the control trains on every thread, after the pretrained run
    assert jobs == {"random": ((), True), "pretrained": ((), True)} and list(jobs) == ["pretrained", "random"]
    assert done == {"mini CLIP", "mini HuBERT"}
    caches = tmp_path / "cache" / "upstream_states" / "some-upstream"
    caches.mkdir(parents=True)
    plan()  # the mini HuBERT's pre-training is finished: its state caches stay
    assert caches.is_dir()
    finished_encoders.discard("hubert")
    plan()  # it will be pre-trained again: the caches of the old one go before any job builds new ones
    assert not caches.exists()


def test_the_demo_runs_trim_the_heap_after_validation_not_between_steps(monkeypatch, tmp_path):
    """Batches padded to 8-frame multiples keep the heap from growing, so the demo's runs trim only after
    each validation (whose batches leave other block sizes); an interval, if given, still trims every N steps."""
    from types import SimpleNamespace

    from speechclip.demo import train

    trims, used = [], []
    monkeypatch.setattr(train, "release_free_memory", lambda: trims.append(1) or True)
    default, every_3 = train.ReleaseFreeMemory(), train.ReleaseFreeMemory(every=3)
    for step in range(1, 10):
        for callback in (default, every_3):
            callback.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, step)
    assert len(trims) == 3  # steps 3, 6 and 9 of the interval; none of the default
    default.on_validation_end(SimpleNamespace(), None)
    assert len(trims) == 4
    monkeypatch.setattr(train, "run_config_from_dict", lambda values: values)
    monkeypatch.setattr(train, "fit", lambda config, run_dir, progress, callbacks, overwrite: used.extend(callbacks) or {})
    train.train_one({}, {}, tmp_path, "run", bars=False)
    assert [c.every for c in used if isinstance(c, train.ReleaseFreeMemory)] == [0]


def test_a_pretraining_marker_cut_short_means_build_again(tmp_path):
    """pretrain.json says "this encoder is finished"; one left torn by an older build must not stop the demo."""
    from dataclasses import dataclass

    from speechclip.demo.run import pretrain_once

    @dataclass
    class Spec:
        steps: int = 3

    builds = []
    build = lambda: builds.append(1) or {"steps": 3}  # noqa: E731
    (tmp_path / "pretrain.json").write_text('{"spec": {"ste')
    assert pretrain_once(tmp_path, Spec(), build)["reused"] is False and len(builds) == 1
    assert pretrain_once(tmp_path, Spec(), build)["reused"] is True and len(builds) == 1
    assert pretrain_once(tmp_path, Spec(steps=4), build)["reused"] is False and len(builds) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["pretrain.json"]


def test_fp32_demo_spec_turns_bf16_off_everywhere(tmp_path):
    """--fp32: the pre-trainings and both SpeechCLIP runs in fp32, what a CPU without bf16 units computes;
    the default asks for bf16 wherever the CPU has it."""
    from speechclip.demo.spec import DemoSpec, speechclip_config
    from speechclip.pretrain.precision import cpu_has_fast_bf16

    spec = DemoSpec().in_fp32()
    assert not spec.bf16 and not spec.clip.bf16 and not spec.hubert.bf16
    assert spec.seeded(2).hubert.bf16 is False  # a draw of an fp32 build stays fp32
    paths = [tmp_path / name for name in ("hubert", "clip", "corpus", "cache")]
    assert speechclip_config(spec, *paths)["train"]["precision"] == "32-true"
    default = speechclip_config(DemoSpec(), *paths)["train"]["precision"]
    assert default == ("bf16-mixed" if cpu_has_fast_bf16() else "32-true")
    assert DemoSpec().clip.bf16 and DemoSpec().hubert.bf16


def test_the_control_must_end_on_a_validation_step_of_the_pretrained_run():
    """The table compares both runs at the control's last step: only a step where the pretrained run validated."""
    from speechclip.demo.spec import DemoSpec

    assert DemoSpec().control_steps == 275 and DemoSpec(control_steps=550).control_steps == 550
    for steps in (300, 0, 1375):
        with pytest.raises(ValueError, match=rf"^control_steps={steps}: must be a step at which the pretrained run validates"):
            DemoSpec(control_steps=steps)
