"""Seeded multimodal datasets in the real on-disk layout (bastion/data/features.py), where the
label depends on exactly one chosen source, so a model (or a test) can prove which modality
it uses:

    text          the text's marker word decides; audio and visual are pure noise
    audio         the sign of the audio frames' mean along a hidden direction decides
    visual        the same for the visual frames
    audio_visual  XOR of the two signs: neither modality alone beats chance (the interaction)

Labels are "neg" / "pos", balanced in expectation. Each example has 2..max_frames frames of
Gaussian noise plus, when its stream carries a sign s, s * strength * direction in every
frame. `missing` drops each modality of each example with that chance (a float: every modality;
a dict: per modality) (the id is left out of
the file: the layout's "modality missing"). Same arguments -> identical files (random.Random
for the text, numpy's PCG64 for the features).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from synthetic.labelled import _filler

Source = Literal["text", "audio", "visual", "audio_visual"]
SOURCES: tuple[Source, ...] = ("text", "audio", "visual", "audio_visual")
LABELS = ["neg", "pos"]
TEXT_MARKERS = {"neg": "awful", "pos": "lovely"}
FEATURES = {"audio": 8, "visual": 6}


def _stream(rng: np.random.Generator, direction: np.ndarray, sign: float, max_frames: int,
            strength: float) -> np.ndarray:
    frames = int(rng.integers(2, max_frames + 1))
    noise = rng.standard_normal((frames, direction.size)).astype(np.float32)
    return noise + np.float32(sign * strength) * direction


def write_multimodal_split(folder: str | Path, split: str, n: int, source: Source, *, seed: int = 0,
                           max_frames: int = 12, strength: float = 1.0,
                           missing: float | dict[str, float] = 0.0) -> Path:
    """Write <folder>/<split>.jsonl ({"id", "text", "label"}) and <split>.audio.safetensors /
    <split>.visual.safetensors; returns the JSONL path. The hidden directions depend on
    `seed` only, so splits written with the same seed share them (train on one, test on
    another written with a different `split` name but the same seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    directions = {m: _unit(np.random.default_rng([seed, i]), size) for i, (m, size) in enumerate(FEATURES.items())}
    words = random.Random(f"{seed}:{split}")
    rng = np.random.default_rng([seed, 1000 + sum(split.encode())])
    records, streams = [], {m: {} for m in FEATURES}
    for i in range(n):
        signs = {m: float(rng.choice([-1.0, 1.0])) for m in FEATURES}
        text_label = LABELS[int(rng.integers(0, 2))]
        if source == "text":
            label = text_label
        elif source == "audio_visual":
            label = LABELS[int(signs["audio"] != signs["visual"])]
        else:
            label = LABELS[int(signs[source] > 0)]
        words_of = _filler(words)
        if source == "text":
            words_of.insert(words.randint(0, len(words_of)), TEXT_MARKERS[text_label])
        example_id = f"{split}_{i:05d}"
        records.append({"id": example_id, "text": " ".join(words_of), "label": label})
        for m in FEATURES:
            informative = source == m or source == "audio_visual"
            sign = signs[m] if informative else 0.0
            values = _stream(rng, directions[m], sign, max_frames, strength)
            if rng.random() >= (missing.get(m, 0.0) if isinstance(missing, dict) else missing):
                streams[m][example_id] = torch.from_numpy(values)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for m, tensors in streams.items():
        save_file(tensors, str(folder / f"{split}.{m}.safetensors"))
    return path


def _unit(rng: np.random.Generator, size: int) -> np.ndarray:
    v = rng.standard_normal(size).astype(np.float32)
    return v / np.linalg.norm(v)
