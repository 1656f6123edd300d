"""Child-process smoke check of a ggml model: load it and transcribe one second of audio.

Run as ``python -m katydid_worker.smoke PATH``. Exit 0 means the file loads and decodes; a corrupt
file makes whisper.cpp crash this process, not its parent. The last line it prints is JSON with
what whisper.cpp says of the model (``{"ok": true, "multilingual": false}``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid_worker.engine import Engine
from katydid_worker.engine_options import EngineOptions


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m katydid_worker.smoke MODEL.bin", file=sys.stderr)
        return 2
    # One full-window decode, whatever the audio: no clip context (whose calibration would
    # spend ~10 s of near-empty decodes on a base model) and no speech gate (which would skip
    # the decode of a tone and leave the file's decoding untried).
    engine = Engine(Path(argv[0]), EngineOptions(clip_context=False, speech_gate=False))
    t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    tone = (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)
    engine.transcribe(tone)
    print(json.dumps({"ok": True, "multilingual": bool(engine.multilingual)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
