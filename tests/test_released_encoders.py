"""The mini encoders the package ships (demo/released.py): what the demo's own recipe builds, intact, loadable."""

import hashlib
import json
from dataclasses import asdict

import pytest

from speechclip.demo.released import RELEASED, same_recipe
from speechclip.demo.spec import DemoSpec


@pytest.mark.parametrize("name", ["clip", "hubert"])
def test_the_released_encoders_are_the_demo_specs_and_intact(name):
    """A change to the demo's pre-training spec without a new release would silently pre-train again on every
    first run (five minutes): it fails here instead. Every file is the one released (its SHA-256)."""
    log = json.loads((RELEASED / name / "pretrain.json").read_text())
    wanted = json.loads(json.dumps(asdict(getattr(DemoSpec(), name))))
    assert same_recipe(log["spec"], wanted), f"the released mini {name} was built to another spec: release it again"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (RELEASED / name).iterdir() if p.name != "pretrain.json"}
    assert files == log["released"]["sha256"]
    assert log["steps"] == wanted["steps"] and len(log["losses"]) == wanted["steps"]


def test_the_released_encoders_load_as_the_specs_architecture():
    from transformers import HubertModel

    from speechclip.clip import FrozenCLIP
    from speechclip.pretrain.mini_hubert import hubert_config

    spec = DemoSpec()
    hubert = HubertModel.from_pretrained(RELEASED / "hubert")
    saved = {"transformers_version", "architectures", "_name_or_path", "dtype"}  # what saving and loading add
    architecture = lambda config: {k: v for k, v in config.to_dict().items() if k not in saved}  # noqa: E731
    assert architecture(hubert.config) == architecture(hubert_config(spec.hubert))
    clip = FrozenCLIP(str(RELEASED / "clip"))
    assert clip.embed_dim == spec.clip.projection_dim
    tokens = clip.tokenize(["a red ball on the grass"])
    assert clip.text_features(tokens["input_ids"], tokens["attention_mask"]).shape == (1, spec.clip.projection_dim)


def test_a_first_build_takes_them_and_pretrain_builds_its_own(tmp_path, monkeypatch):
    """The full demo's stage 2 on an empty folder: no pre-training job, the released files copied byte for byte,
    also in fp32 (a CPU without bf16 units computes only the SpeechCLIP runs otherwise); --pretrain, another seed:
    both encoders pre-trained."""
    import speechclip.demo.run as demo_run

    monkeypatch.setattr(demo_run, "runs_in_workers", lambda threads: True)
    for spec in (DemoSpec(), DemoSpec().in_fp32()):
        jobs, done = demo_run._jobs(tmp_path, spec, tmp_path / "corpus", [], retrain=False, plus=False)
        assert [job.name for job in jobs] == ["pretrained", "random"] and all(job.whole_machine for job in jobs)
        assert done["mini HuBERT"]["released"]["commit"] and done["mini CLIP"]["released"]["commit"]
    for name in ("clip", "hubert"):
        for file in (RELEASED / name).iterdir():
            assert (tmp_path / "encoders" / name / file.name).read_bytes() == file.read_bytes()
    for spec, pretrain in ((DemoSpec(), True), (DemoSpec().seeded(1), False)):
        jobs, done = demo_run._jobs(tmp_path, spec, tmp_path / "corpus", [], retrain=False, plus=False, pretrain=pretrain)
        assert [job.name for job in jobs][:2] == ["mini CLIP", "mini HuBERT"] and not done
