"""What the demo builds: the corpus, the two mini encoders and the SpeechCLIP runs, by step counts.

Step counts, not wall time, fix every training: a slower machine takes longer and gets the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.synthetic import CorpusSpec
from ..pretrain.mini_clip import MiniCLIPSpec
from ..pretrain.mini_hubert import MiniHubertSpec
from ..pretrain.precision import cpu_has_fast_bf16


@dataclass
class DemoSpec:
    # five test folds of 200 images: the quality check's ratio to a standard error of about 0.018 instead of 0.04
    corpus: CorpusSpec = field(default_factory=lambda: CorpusSpec(test_folds=5))
    clip: MiniCLIPSpec = field(default_factory=MiniCLIPSpec)
    hubert: MiniHubertSpec = field(default_factory=MiniHubertSpec)
    # 1,100 steps of 128 clips: with two shared layers (below) they reach more than one layer did in 2,200
    # (pooled ratio 0.825 / 0.864 against 0.748 / 0.769 on draws 0 / 1) in about the same time, since a step
    # costs twice as much; 2,200 steps of two layers gave 0.885 / 0.911 for twice the time (RESULTS.md
    # "demo stages", stop 25).
    speechclip_steps: int = 1100
    # The control (the same head on a random frozen upstream) trains a quarter as long, since it only has to show
    # that a random upstream leaves the head next to nothing to read (3.0 % speech->image R@1 after 1,100 steps
    # at stop 26): its 825 steps were a fifth of the demo's work. Both runs validate at step 275, where the
    # table compares them at the same step; the pretrained run trains on every thread once the control is done (schedule.py).
    control_steps: int = 275
    batch_size: int = 128
    plus_steps: int = 4400  # hybrid_plus (--plus): the length, batch and one shared layer its figures were measured at (README)
    plus_batch_size: int = 64
    lr: float = 2e-3
    num_keywords: int = 6
    num_heads: int = 4  # the hybrid's one shared layer (reference Base: 1 head at width 768)
    # The shared layer as a full Transformer layer and an MLP parallel projection (both SpeechCLIP+ Large
    # options: its COCO hybrid's shared layer, its Large projections): the Base structure (attention only, a
    # linear projection) reached 0.60x the ceiling on the demo, this one with lr 2e-3 0.77x (RESULTS.md, "demo stages")
    shared_layer: str = "transformer"
    # Two such layers (the reference's transformer_args.n_layers, 1 in every released config): in the first,
    # frames attend to each other, so a word's phones come together before the [CLS] and keyword tokens read
    # them; with one, each token reads a weighted average of single frames. The speech head fitted even its
    # own training scenes to only 0.76-0.82 of the text tower with one layer (RESULTS.md, stop 24).
    shared_layers: int = 2
    ffn_dim: int = 512
    projection_hidden: tuple[int, ...] = (512,)
    plus_max_keywords: int = 30  # hybrid_plus (--plus): CIF fires at most this many (mini CLIP: 32 positions - 2)
    speechclip_seed: int = 7  # the training layer's default seed
    # bf16 autocast where the CPU has bf16 units (the pre-trainings and the SpeechCLIP runs); False: fp32 everywhere,
    # the arithmetic of a CPU without them (AVX2 only), to check its figures on a machine that has them
    bf16: bool = True

    def __post_init__(self) -> None:
        every = validation_interval(self.speechclip_steps)
        if not 0 < self.control_steps <= self.speechclip_steps or self.control_steps % every:
            raise ValueError(f"control_steps={self.control_steps}: must be a step at which the pretrained run validates "
                             f"(a multiple of {every}, at most speechclip_steps={self.speechclip_steps}), for the same-step comparison")

    def seeded(self, seed: int) -> "DemoSpec":
        """Another draw of every training run (mini CLIP, mini HuBERT, the SpeechCLIP runs, the control's
        random upstream) on the same corpus, so the test set stays the same: seed 0 is the default build."""
        return replace(self, clip=replace(self.clip, seed=self.clip.seed + seed), hubert=replace(self.hubert, seed=self.hubert.seed + seed),
                       speechclip_seed=self.speechclip_seed + seed)

    @property
    def computes_bf16(self) -> bool:
        """Whether the trainings run in bf16 autocast here: asked for, and the CPU has bf16 units."""
        return self.bf16 and cpu_has_fast_bf16()

    def in_fp32(self) -> "DemoSpec":
        """The same build computed in fp32 throughout, as on a CPU without bf16 units."""
        return replace(self, clip=replace(self.clip, bf16=False), hubert=replace(self.hubert, bf16=False), bf16=False)

    @classmethod
    def quick(cls) -> "DemoSpec":
        """Seconds, not minutes: every stage runs, on a toy scale (what the tests use)."""
        return cls(corpus=CorpusSpec(num_scenes=24, num_clipart=4, captions_per_image=2, val_images=4, test_images=6, test_folds=2),
                   clip=MiniCLIPSpec(width=32, layers=1, heads=2, vocab_size=300, steps=5, batch_size=16, projection_dim=32),
                   hubert=MiniHubertSpec(width=32, layers=1, heads=2, clusters=8, steps=3, batch_size=4,
                                         conv_dims=(16,) * 5),
                   speechclip_steps=4, control_steps=2, plus_steps=4, batch_size=8, plus_batch_size=8, num_keywords=2, num_heads=2, plus_max_keywords=8, ffn_dim=64,
                   projection_hidden=(64,))


def validation_interval(steps: int) -> int:
    """A demo SpeechCLIP run of `steps` validates and checkpoints four times (the control at the same steps)."""
    return max(1, steps // 4)


def speechclip_config(spec: DemoSpec, upstream: Path, clip: Path, corpus: Path, cache: Path, variant: str = "hybrid",
                      max_steps: int | None = None) -> dict:
    """The run configuration of one demo SpeechCLIP run (hybrid, or hybrid_plus for the SpeechCLIP+ line).
    max_steps: a shorter run (the control), validated and checkpointed at the same steps as the full one."""
    steps, batch_size = (spec.speechclip_steps, spec.batch_size) if variant == "hybrid" else (spec.plus_steps, spec.plus_batch_size)
    every = validation_interval(steps)
    steps = max_steps or steps
    model: dict = {"upstream": str(upstream), "clip": str(clip), "variant": variant,
                   "parallel": {"projection_hidden": list(spec.projection_hidden)}}
    shared = {"num_heads": spec.num_heads, "attention": spec.shared_layer, "ffn_dim": spec.ffn_dim}
    if variant == "hybrid":  # SpeechCLIP+ hybrid: the layers shared by the parallel CLS and the keywords
        model["cascaded"] = {"num_keywords": spec.num_keywords, "num_layers": spec.shared_layers, **shared}
    else:  # hybrid_plus: the same shared layer over [CLS, frames], keywords fired by CIF from the frames
        model["cascaded"] = shared
        # the reference's 2.5 keywords per second (20 frames at 50 Hz) at the mini HuBERT's frame rate, and its
        # length scaling for the first tenth of training (5,000 of 50,000 steps)
        model["cif"] = {"max_keywords": spec.plus_max_keywords, "frames_per_keyword": 20.0 * 320 / spec.hubert.stride,
                        "scaling_steps": max(1, steps // 10)}
    return {
        "model": model,
        "data": {"kind": "manifest", "root": str(corpus)},
        # precision: in bf16 a step alone on two threads took 0.23 s against 0.28 in fp32, validation included
        # (draw 0 of each; RESULTS.md "demo stages", stop 29)
        "train": {"batch_size": batch_size, "lr": spec.lr, "warmup_steps": max(1, steps // 10),
                  "max_steps": steps, "final_lr": spec.lr * 1e-3, "val_every_steps": every,
                  "checkpoint_every_steps": every, "num_workers": 0, "cache_dir": str(cache),
                  "cache_upstream_states": True, "log_every_steps": 10, "seed": spec.speechclip_seed,
                  "precision": "bf16-mixed" if spec.computes_bf16 else "32-true"},
    }
