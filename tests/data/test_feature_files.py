"""Modality feature files (bastion/data/features.py): the synthetic multimodal layout reads back,
a missing modality is an absent id, and every malformed file is one clear DataError naming the
file, the example and the modality; the config bounds of finetune.sequence.modalities."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bastion.config import build_config
from bastion.data.features import feature_file_path, read_feature_file, read_split_features
from bastion.errors import ConfigError, DataError
from synthetic.multimodal import FEATURES, SOURCES, write_multimodal_split

MODALITIES = {"audio": {"features": 8, "max_frames": 12}, "visual": {"features": 6, "max_frames": 12}}
LIMIT = 2**20


def _modalities():
    cfg = build_config({"finetune": {"sequence": {"modalities": MODALITIES}}})
    return cfg.finetune.sequence.modalities


def _ids(jsonl):
    return [json.loads(line)["id"] for line in jsonl.read_text().splitlines()]


def _read(path, roots, **kw):
    return read_feature_file(path, "audio", 8, 12, roots, max_bytes=kw.pop("max_bytes", LIMIT), **kw)


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


# ---- the layout reads back -----------------------------------------------------------------


def test_synthetic_split_reads_back_with_every_example(tmp_path):
    jsonl = write_multimodal_split(tmp_path, "train", 40, "audio_visual", seed=3)
    ids = _ids(jsonl)
    streams = read_split_features(jsonl, _modalities(), [tmp_path], max_bytes=LIMIT, ids=set(ids))
    assert set(streams) == {"audio", "visual"}
    for name, per_example in streams.items():
        assert list(per_example) == sorted(ids)
        for values in per_example.values():
            assert values.dtype == torch.float32 and values.shape[1] == FEATURES[name] and 2 <= values.shape[0] <= 12
    assert feature_file_path(jsonl, "audio") == tmp_path / "train.audio.safetensors"


def test_same_seed_same_files_and_sources_are_what_they_say(tmp_path):
    a = write_multimodal_split(tmp_path / "a", "train", 200, "audio", seed=5)
    b = write_multimodal_split(tmp_path / "b", "train", 200, "audio", seed=5)
    assert a.read_text() == b.read_text()
    for m in FEATURES:
        assert (tmp_path / "a" / f"train.{m}.safetensors").read_bytes() == (tmp_path / "b" / f"train.{m}.safetensors").read_bytes()
    # the audio source: the sign of the mean frame's projection on the hidden direction is the label,
    # found back here by the class-mean difference; visual carries nothing.
    labels = np.array([json.loads(line)["label"] == "pos" for line in a.read_text().splitlines()])
    streams = read_split_features(a, _modalities(), [tmp_path], max_bytes=LIMIT)
    for m, informative in (("audio", True), ("visual", False)):
        means = np.stack([streams[m][i].mean(0).numpy() for i in _ids(a)])
        direction = means[labels].mean(0) - means[~labels].mean(0)
        accuracy = ((means @ direction > 0) == labels).mean()
        assert (accuracy > 0.9) if informative else (accuracy < 0.75), (m, accuracy)


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_writes_balanced_labels(tmp_path, source):
    jsonl = write_multimodal_split(tmp_path, "val", 200, source, seed=1)
    labels = [json.loads(line)["label"] for line in jsonl.read_text().splitlines()]
    assert 60 <= labels.count("pos") <= 140


def test_missing_modality_is_an_absent_id(tmp_path):
    jsonl = write_multimodal_split(tmp_path, "train", 100, "text", seed=2, missing=0.3)
    streams = read_split_features(jsonl, _modalities(), [tmp_path], max_bytes=LIMIT, ids=set(_ids(jsonl)))
    for per_example in streams.values():
        assert 40 <= len(per_example) <= 95  # about 70 of 100 kept


# ---- every malformed file: one clear error ---------------------------------------------------


def test_wrong_width_names_example_and_modality(tmp_path):
    path = _write(tmp_path / "f.safetensors", {"ex1": torch.zeros(3, 8), "ex2": torch.zeros(3, 7)})
    with pytest.raises(DataError, match=r"example 'ex2', modality 'audio': has 7 features per frame.*declares 8"):
        _read(path, [tmp_path])


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(13, 8), r"13 frames, over .*audio.max_frames = 12"),
    (torch.zeros(0, 8), r"has no frames"),
    (torch.zeros(2, 3, 8), r"is not \[frames, features\]"),
    (torch.zeros(8), r"is not \[frames, features\]"),
    (torch.zeros(3, 8, dtype=torch.int32), r"dtype I32 is not a float feature type"),
    (torch.zeros(3, 8, dtype=torch.float64), r"dtype F64 is not a float feature type"),
])
def test_bad_shape_length_and_dtype(tmp_path, tensor, message):
    path = _write(tmp_path / "f.safetensors", {"ok": torch.zeros(2, 8), "bad": tensor})
    with pytest.raises(DataError, match=r"example 'bad', modality 'audio': .*" + message):
        _read(path, [tmp_path])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_refused(tmp_path, value):
    bad = torch.zeros(4, 8, dtype=torch.float16)
    bad[2, 5] = value
    path = _write(tmp_path / "f.safetensors", {"clip_7": bad})
    with pytest.raises(DataError, match=r"example 'clip_7', modality 'audio': contains NaN or Inf"):
        _read(path, [tmp_path])


def test_half_precision_features_become_float32(tmp_path):
    path = _write(tmp_path / "f.safetensors", {"a": torch.ones(2, 8, dtype=torch.bfloat16),
                                               "b": torch.ones(3, 8, dtype=torch.float16)})
    out = _read(path, [tmp_path])
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == {"a": (torch.float32, (2, 8)),
                                                                      "b": (torch.float32, (3, 8))}


def test_truncated_file_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "f.safetensors", {"ex1": torch.zeros(5, 8)})
    data = path.read_bytes()
    for cut in (4, 20, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"feature file of modality 'audio'.*not a complete safetensors file"):
            _read(path, [tmp_path])
    path.write_bytes(data + b"\0\0")  # stray bytes after the last tensor
    with pytest.raises(DataError, match=r"trailing bytes"):
        _read(path, [tmp_path])


def test_oversized_file_refused_before_parsing(tmp_path):
    path = _write(tmp_path / "f.safetensors", {"ex1": torch.zeros(12, 8)})
    with pytest.raises(DataError, match=r"over finetune.sequence.max_feature_file_bytes = 100"):
        _read(path, [tmp_path], max_bytes=100)


def test_outside_roots_and_symlinks_out_refused(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    path = _write(outside / "f.safetensors", {"ex1": torch.zeros(2, 8)})
    with pytest.raises(DataError, match=r"feature file of modality 'audio'.*outside the allowed roots"):
        _read(path, [inside])
    os.symlink(path, inside / "link.safetensors")
    with pytest.raises(DataError, match=r"through a symlink"):
        _read(inside / "link.safetensors", [inside])
    with pytest.raises(DataError, match=r"'\.\.' component"):
        _read(inside / ".." / "out" / "f.safetensors", [tmp_path])


def test_unknown_id_and_missing_stream_refused(tmp_path):
    jsonl = write_multimodal_split(tmp_path, "train", 5, "audio", seed=0)
    _write(tmp_path / "train.audio.safetensors", {"train_00000": torch.zeros(2, 8), "trian_00001": torch.zeros(2, 8)})
    with pytest.raises(DataError, match=r"example 'trian_00001', modality 'audio': names no example"):
        read_split_features(jsonl, _modalities(), [tmp_path], max_bytes=LIMIT, ids=set(_ids(jsonl)))
    (tmp_path / "train.visual.safetensors").unlink()
    with pytest.raises(DataError, match=r"feature file of modality 'visual' not found"):
        read_split_features(jsonl, {"visual": _modalities()["visual"]}, [tmp_path], max_bytes=LIMIT)


def test_bad_tensor_name_refused(tmp_path):
    path = _write(tmp_path / "f.safetensors", {"a\tb": torch.zeros(2, 8)})
    with pytest.raises(DataError, match=r"tensor name is not an example id"):
        _read(path, [tmp_path])


# ---- config bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize("sequence, field", [
    ({"modalities": {"audio": {"features": 0, "max_frames": 10}}}, "features"),
    ({"modalities": {"audio": {"features": 8193, "max_frames": 10}}}, "features"),
    ({"modalities": {"audio": {"features": 8, "max_frames": 10_001}}}, "max_frames"),
    ({"modalities": {"audio": {"features": 8}}}, "max_frames"),
    ({"modalities": {"audio": {"features": 8, "max_frames": 10, "rate": 100}}}, "rate"),
    ({"modalities": {f"m{i}": {"features": 1, "max_frames": 1} for i in range(9)}}, "modalities"),
    ({"modalities": {"Audio/x": {"features": 1, "max_frames": 1}}}, "modalities"),
    ({"modality_dropout": 1.5}, "modality_dropout"),
])
def test_config_bounds(sequence, field):
    with pytest.raises(ConfigError) as err:
        build_config({"finetune": {"sequence": sequence}})
    assert any(field in path for path, _ in err.value.problems), err.value.problems
