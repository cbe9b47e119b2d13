"""bastion/model/fusion.py: a tiny scoring transformer with gated cross-modal fusion, trained by
hand on the synthetic multimodal datasets read through the real feature reader, learns each
source; removing the informative modality at evaluation drops it to chance; the interaction
needs both; a missing modality contributes exactly zero and trains and predicts."""
from __future__ import annotations

import json

import pytest
import torch

from bastion.config import build_config
from bastion.data.features import pad_frames, read_split_features
from bastion.model import Transformer
from bastion.model.fusion import FrameBatch, batch_streams
from bastion.model.heads import sequence_scores
from synthetic.multimodal import FEATURES, write_multimodal_split

MAX_FRAMES = 12
MODALITIES = {"audio": {"features": FEATURES["audio"], "max_frames": MAX_FRAMES},
              "visual": {"features": FEATURES["visual"], "max_frames": MAX_FRAMES}}
VOCAB, TEXT_TOKENS = 64, 24


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = build_config({"model": {"vocab_size": VOCAB, "d_model": 32, "n_layer": 1, "n_head": 4, "n_kv_head": 2,
                                  "max_seq_len": 32, "score_labels": 2, "modalities": MODALITIES},
                        "train": {"seq_len": 32}})
    return Transformer(cfg.model)


def _split(folder, split, source, n, **kw):
    jsonl = write_multimodal_split(folder, split, n, source, seed=11, max_frames=MAX_FRAMES, **kw)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    cfg = build_config({"finetune": {"sequence": {"modalities": MODALITIES}}})
    streams = read_split_features(jsonl, cfg.finetune.sequence.modalities, [folder], max_bytes=2**24,
                                  ids={r["id"] for r in records})
    ids = torch.zeros(len(records), TEXT_TOKENS, dtype=torch.long)  # pad 0; byte-level ids, cut
    for row, r in enumerate(records):
        codes = [1 + b % (VOCAB - 1) for b in r["text"].encode()][:TEXT_TOKENS]
        ids[row, : len(codes)] = torch.tensor(codes)
    labels = torch.tensor([r["label"] == "pos" for r in records], dtype=torch.long)
    return {"ids": ids, "labels": labels, "frames": {m: [streams[m].get(r["id"]) for r in records] for m in FEATURES}}


def _batches(data, rows, without=()):
    batch = {}
    for m in FEATURES:
        frames = [None if m in without else data["frames"][m][i] for i in rows]
        batch |= pad_frames(frames, FEATURES[m], prefix=f"streams.{m}.")
    return batch_streams(batch, sorted(FEATURES))


def _scores(model, data, rows, without=()):
    return sequence_scores(model, data["ids"][rows], 0, _batches(data, rows, without))


def _train(data, steps=120, dropout=0.0, seed=0):
    model = _model(seed)
    model.fusion.modality_dropout = dropout
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(data["labels"]), (32,), generator=gen).tolist()
        loss = torch.nn.functional.cross_entropy(_scores(model, data, rows), data["labels"][rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def _accuracy(model, data, without=(), rows=None):
    rows = list(range(len(data["labels"]))) if rows is None else rows
    scores = _scores(model, data, rows, without)
    assert torch.isfinite(scores).all()
    return (scores.argmax(-1) == data["labels"][rows]).float().mean().item()


# ---- the mechanics -------------------------------------------------------------------------


def test_without_streams_the_fused_model_scores_as_its_text_model():
    model = _model()
    ids = torch.randint(1, VOCAB, (3, 10))
    fused, _ = model(ids)  # no streams: every modality missing
    text_cfg = model.cfg.model_copy(update={"modalities": {}})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fusion.")}
    text, _ = Transformer.from_state_dict(text_cfg, state)(ids)
    assert torch.equal(fused, text)
    with pytest.raises(ValueError, match="do not fit model.modalities"):
        model(ids, streams={"sound": _batches({"frames": {"audio": [None] * 3, "visual": [None] * 3}}, [0, 1, 2])["audio"]})


def test_missing_modality_contributes_exactly_zero_even_with_nan_frames():
    fusion = _model().fusion
    fusion.eval()
    text = torch.randn(2, 5, 32)
    frames = torch.randn(2, 4, FEATURES["audio"])
    frames[1] = float("nan")  # the absent row's padding must not leak
    audio = FrameBatch(frames, torch.ones(2, 4, dtype=torch.bool), torch.tensor([True, False]))
    out = fusion(text, {"audio": audio})
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], text[1])  # nothing present: the text states unchanged, bit for bit
    assert not torch.equal(out[0], text[0])
    assert torch.equal(fusion(text, {}), text)
    # frames past an example's length are masked: changing them changes nothing
    short = FrameBatch(frames.nan_to_num(0.0), torch.tensor([[True, True, False, False]] * 2), torch.tensor([True] * 2))
    changed = FrameBatch(short.frames.clone(), short.frame_mask, short.present)
    changed.frames[:, 2:] = 99.0
    torch.testing.assert_close(fusion(text, {"audio": short}), fusion(text, {"audio": changed}))


def test_parameter_names_are_plain_and_per_modality():
    names = {name for name, _ in _model().named_parameters()}
    assert {"fusion.streams.audio.proj.weight", "fusion.streams.visual.gate.weight",
            "fusion.streams.audio.position.weight", "score.weight"} <= names


# ---- learning and ablation ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fusion")


@pytest.mark.parametrize("source", ["audio", "visual"])
def test_learns_the_informative_modality_and_ablation_drops_to_chance(folder, source):
    train = _split(folder / source, "train", source, 320)
    val = _split(folder / source, "val", source, 200)
    model = _train(train, steps=80)
    other = "visual" if source == "audio" else "audio"
    assert _accuracy(model, val) >= 0.9
    assert 0.35 <= _accuracy(model, val, without=(source,)) <= 0.65  # informative stream removed
    assert _accuracy(model, val, without=(other,)) >= 0.85  # the uninformative one: no loss


def test_the_interaction_needs_both_modalities(folder):
    train = _split(folder / "av", "train", "audio_visual", 400)
    val = _split(folder / "av", "val", "audio_visual", 200)
    model = _train(train, steps=200)
    both = _accuracy(model, val)
    assert both >= 0.85, both
    for gone in ("audio", "visual"):
        assert 0.35 <= _accuracy(model, val, without=(gone,)) <= 0.65, gone


def test_missing_modalities_train_and_predict(folder):
    train = _split(folder / "missing", "train", "audio", 320, missing=0.3)
    val = _split(folder / "missing", "val", "audio", 200, missing=0.3)
    model = _train(train, steps=100, dropout=0.2)
    has_audio = [i for i, x in enumerate(val["frames"]["audio"]) if x is not None]
    lacks_audio = [i for i, x in enumerate(val["frames"]["audio"]) if x is None]
    assert lacks_audio and _accuracy(model, val, rows=has_audio) >= 0.85
    assert 0.2 <= _accuracy(model, val, rows=lacks_audio) <= 0.8  # predicted (finite), at chance
