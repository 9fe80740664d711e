"""Speech for the offline corpus: espeak-ng, one speaker per (voice, variant, speed, pitch).

Spoken in this process where libespeak-ng loads and resets (data/espeak.py), else by the `espeak-ng` program.
The two gave the same samples on espeak-ng 1.51 (every clip of the demo's corpus; tests/test_espeak.py
checks it wherever the tests run).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

from ..audio import SAMPLE_RATE
from . import espeak
from .items import DataError

# espeak-ng's own English voices (the mbrola ones need an extra binary), and its voice variants.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "Andy",
            "Annie", "david", "linda", "max", "michel")
SPEEDS = (140, 160, 180, 200)  # words per minute
PITCHES = (30, 45, 60, 75)


@dataclass(frozen=True)
class Speaker:
    voice: str
    variant: str
    speed: int
    pitch: int

    @property
    def espeak_voice(self) -> str:
        """espeak-ng's voice argument: the voice with its variant."""
        return f"{self.voice}+{self.variant}"

    @property
    def name(self) -> str:
        return f"{self.espeak_voice}-s{self.speed}-p{self.pitch}"


def all_speakers() -> list[Speaker]:
    """Every combination: 8 voices x 20 variants x 4 speeds x 4 pitches = 2,560 speakers."""
    return [Speaker(*combo) for combo in itertools.product(VOICES, VARIANTS, SPEEDS, PITCHES)]


def espeak_command(text: str, speaker: Speaker, wav: str) -> list[str]:
    """The espeak-ng command line that speaks `text` as `speaker` into `wav` (22,050 Hz, as espeak-ng makes it)."""
    return ["espeak-ng", "-v", speaker.espeak_voice, "-s", str(speaker.speed), "-p", str(speaker.pitch),
            "-w", wav, text]


def synthesize(text: str, speaker: Speaker, out: Path, in_process: bool | None = None) -> float:
    """Speak `text` into a 16 kHz mono wav at `out`; returns its duration in seconds.
    in_process: through libespeak-ng (default: where it loads and resets) or False for the espeak-ng program."""
    in_process = espeak.available() if in_process is None else in_process
    wave, rate = _library_wave(text, speaker, out) if in_process else program_wave(text, speaker, out)
    if wave.size == 0:
        raise DataError(f"{out}: espeak-ng produced no audio for {text!r}")
    samples = wave.astype(np.float32) / 32768  # as soundfile reads 16-bit PCM
    samples = _trim(soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32))
    tmp = out.with_suffix(".tmp.wav")
    soundfile.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16")
    tmp.replace(out)  # atomic: an interrupted build never leaves a half-written wav behind
    return len(samples) / SAMPLE_RATE


def program_wave(text: str, speaker: Speaker, out: Path | str = "speech") -> tuple[np.ndarray, int]:
    """What `espeak-ng -w` writes for `text` as `speaker`: 16-bit samples at its own rate (22,050 Hz).
    `out` names the clip in an error."""
    if shutil.which("espeak-ng") is None:
        raise DataError("espeak-ng not found; install Debian's espeak-ng (scripts/setup.sh does)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        result = subprocess.run(espeak_command(text, speaker, raw.name), capture_output=True, timeout=60)
        if result.returncode != 0:
            reason = " ".join(result.stderr.decode(errors="ignore").split())[:200]
            raise DataError(f"{out}: espeak-ng failed for {speaker.name} ({reason})")
        wave, rate = soundfile.read(raw.name, dtype="int16")
    return wave, rate


def _library_wave(text: str, speaker: Speaker, out: Path) -> tuple[np.ndarray, int]:
    """The same samples from libespeak-ng in this process (data/espeak.py)."""
    if not espeak.available():
        raise DataError(f"{out}: libespeak-ng cannot be loaded and reset in this process; "
                        "in_process=False speaks with the espeak-ng program")
    try:
        return espeak.speak(text, speaker.espeak_voice, speaker.speed, speaker.pitch)
    except espeak.EspeakError as error:
        raise DataError(f"{out}: {error} (speaker {speaker.name})") from None


def _trim(samples: np.ndarray, threshold: float = 1e-3, margin: int = 1600) -> np.ndarray:
    """Cut leading/trailing silence down to 0.1 s (espeak pads generously)."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    if loud.size == 0:
        return samples
    return samples[max(0, loud[0] - margin) : loud[-1] + margin]
