"""Regenerates the small fixture media in this folder and the job in ``test_input.json``.

* ``face.jpg``: a 320x320 crop around the face of scikit-image's ``astronaut`` sample photo.
* ``speech.wav``: a short English sentence spoken by espeak-ng, 16 kHz mono 16-bit PCM.

Run with the project's interpreter from anywhere: ``python tests/assets/make_assets.py``
(needs ``espeak-ng`` on PATH and scikit-image installed).
"""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image
from skimage import data

ASSETS = Path(__file__).resolve().parent
REPO_ROOT = ASSETS.parent.parent
SENTENCE = "Hello. This is a short test."
SAMPLE_RATE = 16_000


def make_face(path: Path) -> None:
    """Crop the astronaut photo (512x512 RGB) to a 320x320 square around the face."""
    photo = data.astronaut()  # (512, 512, 3) uint8
    crop = photo[0:320, 65:385]
    Image.fromarray(crop).save(path, format="JPEG", quality=85)


def make_speech(path: Path) -> None:
    """Speak SENTENCE with espeak-ng and resample it to 16 kHz mono PCM."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "165", "-w", str(raw), SENTENCE], check=True)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        with av.open(str(raw)) as container:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    sf.write(path, np.concatenate(chunks), SAMPLE_RATE, subtype="PCM_16")


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def main() -> None:
    face, speech = ASSETS / "face.jpg", ASSETS / "speech.wav"
    make_face(face)
    make_speech(speech)
    job = {
        "input": {
            "image": data_uri(face, "image/jpeg"),
            "audio": data_uri(speech, "audio/wav"),
            "prompt": "A person is talking.",
            "seed": 42,
            "steps": 50,
            "guidance": 3.5,
            "framing": "upstream",
            "output": {"mode": "auto", "filename": "test_output.mp4"},
        }
    }
    (REPO_ROOT / "test_input.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
