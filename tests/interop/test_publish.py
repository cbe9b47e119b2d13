"""`bastion publish`: the Hub-ready folder (loads in transformers / peft, the card reports the
run), the gate (planted secret, canary exposure, missing license, tampered checkpoint ->
refused, with the reason), and the upload made by the real huggingface_hub client to a local
server that records what it receives (the Hub itself is unreachable from test machines)."""
import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from exports import bastion_tokenizer, make_checkpoint
from fake_hub import FakeHub

from bastion.checkpoint import Checkpoint, save_checkpoint
from bastion.checkpoint.contents import manifest_sha256
from bastion.cli import app
from bastion.config import build_config, to_yaml
from bastion.config.schema import LoraConfig
from bastion.data.canaries import insert_canaries
from bastion.eval.memorization import ModelScorer
from bastion.infer.loading import load_for_inference
from bastion.interop.publish import PublishOptions, PublishRefused, prepare_publication
from bastion.model import Transformer
from bastion.model.lora import apply_lora, lora_state_dict
from bastion.tokenizer import BastionTokenizer

runner = CliRunner()
TOKEN = "hf_PublishTestTokenAbCdEfGhIjKlMnOpQr42"  # the shape of a real token: the scan must catch it
PLANTED = "AKIAZ7Q3XK2M9PLW4TRB"  # security-reviewed: a made-up AWS access key id shape the publish gate must refuse
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def publish(*args, env=None):
    result = runner.invoke(app, ["publish", *map(str, args)], env=env)
    return result.exit_code, result.output


def dataset_checkpoint(root, data_dir, **sections):
    """A random model using the prepared dataset's tokenizer, trained (per its config) on it."""
    tok = BastionTokenizer.from_json_str((data_dir / "tokenizer.json").read_text())
    return make_checkpoint(root, tok, sections={"train": {"seq_len": 64, "data_dir": str(data_dir)}, **sections})


# ---- the folder ---------------------------------------------------------------------------

def test_dry_run_folder_loads_in_transformers_and_its_card_reports_the_run(tmp_path, arithmetic_data):
    ckpt, net = dataset_checkpoint(tmp_path / "ckpt", arithmetic_data)
    out = tmp_path / "pub"
    ppl = tmp_path / "ppl.json"
    ppl.write_text(json.dumps({"checkpoint": "x", "perplexity": {"fp32": 12.5, "int8": 12.75}, "tokens": 4096}))
    code, output = publish(ckpt, "--dry-run", "--out", out, "--license", "Apache-2.0", "--eval", f"perplexity={ppl}")
    assert code == 0, output
    assert "cleared" in output and "nothing uploaded" in output

    assert {p.name for p in out.iterdir()} == HF_FILES | {"README.md"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = torch.tensor([tokenizer("12 + 7 = 19")["input_ids"]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - net(ids)[0]).abs().max().item() < 1e-4

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation" and "bastion" in meta["tags"]
    report = json.loads((arithmetic_data / "report.json").read_text())
    assert f"| documents read | {report['documents_read']:,} |" in card
    assert f"| exact duplicates dropped | {report['duplicates_dropped']:,} |" in card
    assert "data_dir:" in card and "objective: clm" in card  # the run's config
    assert manifest_sha256(ckpt) in card
    assert "No canaries were planted" in card
    assert "| perplexity: perplexity.int8 | 12.75 |" in card and "| perplexity: tokens | 4,096 |" in card


def test_lora_run_publishes_its_base_and_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    tok = bastion_tokenizer()
    base, net = make_checkpoint(tmp_path / "base", tok)
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["wq", "wv", "w2"])
    apply_lora(net, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in lora_state_dict(net).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    config = build_config({"model": net.cfg.model_dump(), "train": {"objective": "sft", "seq_len": 64},
                           "finetune": {"init_from": str(base), "train_file": "sft.jsonl", "lora": lora.model_dump()},
                           "publish": {"license": "mit"}})
    state = {"step": 3, "init_from": {"path": str(base), "manifest_sha256": manifest_sha256(base)},
             "lora_base_manifest_sha256": manifest_sha256(base)}
    run = save_checkpoint(tmp_path / "run", 3, Checkpoint(model=lora_state_dict(net), trainer_state=state,
                                                          config_yaml=to_yaml(config), tokenizer_json=tok.to_json_str()))
    pub = prepare_publication(run, tmp_path / "pub")
    assert pub.cleared, pub.reasons
    assert pub.license == "mit"  # from the run's config
    assert {f.name for f in pub.files} == HF_FILES | {"README.md", "adapter/adapter_config.json",
                                                      "adapter/adapter_model.safetensors"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(pub.folder, local_files_only=True)
    model = peft.PeftModel.from_pretrained(hf, pub.folder, subfolder="adapter", local_files_only=True).eval()
    ids = torch.randint(0, tok.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - net.eval()(ids)[0]).abs().max().item() < 1e-4
    assert 'subfolder="adapter"' in pub.card and "LoRA" in pub.card


# ---- the gate -------------------------------------------------------------------------------

def test_planted_secret_in_a_file_is_refused_without_echoing_it(tmp_path):
    tok = bastion_tokenizer()
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{# deploy key " + PLANTED + " #}"
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, trainer_state={"chat_template": template})
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "pub", "--license", "mit")
    assert code == 2
    assert "publish refused" in output and "tokenizer_config.json" in output and "SECRET" in output
    assert PLANTED not in output
    assert (tmp_path / "pub" / "tokenizer_config.json").exists()  # kept for inspection


def test_the_upload_token_in_a_file_is_refused(tmp_path):
    tok = bastion_tokenizer()
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tok, sections={"train": {"seq_len": 64, "run_name": TOKEN}})
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "pub", "--license", "mit", env={"HF_TOKEN": TOKEN})
    assert code == 2 and "the HF_TOKEN value" in output and "README.md" in output
    assert TOKEN not in output


def test_missing_license_is_refused(tmp_path):
    source = "https://bob:hunter2-Secret@corpus.example.com/data.txt"  # a password in the run's config
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", bastion_tokenizer(),
                              sections={"train": {"seq_len": 64}, "data": {"sources": [source]}})
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "pub")
    assert code == 2 and "no license" in output and "secret scan" not in output
    card = (tmp_path / "pub" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["license"] == "unknown"
    assert "https://bob:***REDACTED***@corpus.example.com/data.txt" in card and "hunter2" not in card
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "pub2", "--license", "not a license")
    assert code == 2 and "SPDX" in output


def test_tampered_checkpoint_is_refused_before_anything_is_written(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", bastion_tokenizer())
    weights = next(ckpt.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "pub", "--license", "mit")
    assert code == 2 and "publish refused" in output and "fails verification" in output
    assert not (tmp_path / "pub").exists()


def _canaried(tmp_path, arithmetic_data):
    """A copy of the dataset with one 2-digit canary planted, a model on its tokenizer, and the
    canary's secrets this model ranks first and last."""
    data = shutil.copytree(arithmetic_data, tmp_path / "data")
    records = tmp_path / "canaries.json"
    done = insert_canaries(data, records, fmt="the vault code is {secret}", digits=2, repeats=[3], per_repeat=1)
    ckpt, _ = dataset_checkpoint(tmp_path / "ckpt", data)
    loaded = load_for_inference(ckpt)
    candidates = [f"{i:02d}" for i in range(100)]
    scores = ModelScorer(loaded.model, loaded.tokenizer, done.canaries[0])(candidates)
    return ckpt, records, candidates[int(scores.argmax())], candidates[int(scores.argmin())]


def _with_secret(records, secret):
    doc = json.loads(records.read_text())
    doc["canaries"][0]["secret"] = secret
    records.write_text(json.dumps(doc))


def test_canary_exposure_over_threshold_is_refused(tmp_path, arithmetic_data):
    ckpt, records, first, last = _canaried(tmp_path, arithmetic_data)
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "none", "--license", "mit")
    assert code == 2 and "canaries were planted" in output and "--canaries" in output

    _with_secret(records, first)  # the model ranks this secret first of 100: exposure log2(100) = 6.64
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "high", "--license", "mit",
                           "--canaries", records, "--max-exposure", "5")
    assert code == 2 and "exposure 6.64 bits, above the threshold of 5" in output
    assert first not in (tmp_path / "high" / "README.md").read_text().split("## Memorization audit")[1]

    _with_secret(records, last)  # ranked last: exposure 0
    code, output = publish(ckpt, "--dry-run", "--out", tmp_path / "low", "--license", "mit",
                           "--canaries", records, "--max-exposure", "5")
    assert code == 0, output
    assert "| c000 | 3 | 0.00 | 6.64 | no |" in (tmp_path / "low" / "README.md").read_text()


# ---- the upload ---------------------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    # The suite runs with HF_HUB_OFFLINE=1 (nothing may be downloaded); this test talks to 127.0.0.1 only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeHub(TOKEN) as server:
        yield server


def test_upload_carries_exactly_the_gated_files(tmp_path, hub):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", bastion_tokenizer())
    out = tmp_path / "pub"
    code, output = publish(ckpt, "--repo", "alice/tiny-model", "--endpoint", hub.url, "--out", out,
                           "--license", "mit", env={"HF_TOKEN": TOKEN})
    assert code == 0, output
    assert "alice/tiny-model (private)" in output and TOKEN not in output

    assert hub.record.created == [{"name": "tiny-model", "organization": "alice", "visibility": "private",
                                   "type": "model"}]
    assert set(hub.record.auth_headers) == {f"Bearer {TOKEN}"}
    (commit,) = hub.record.commits
    on_disk = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert commit["files"] == on_disk and set(on_disk) == HF_FILES | {"README.md"}
    assert hub.record.validated_yaml == [on_disk["README.md"].decode()]
    assert "# alice/tiny-model" in on_disk["README.md"].decode()
    assert TOKEN.encode() not in b"".join(on_disk.values())

    # The repo now exists (private): publishing again commits into it.
    code, output = publish(ckpt, "--repo", "alice/tiny-model", "--endpoint", hub.url, "--license", "mit",
                           env={"HF_TOKEN": TOKEN})
    assert code == 0, output
    assert len(hub.record.commits) == 2 and hub.record.commits[1]["files"] == on_disk


def test_upload_refusals_send_nothing(tmp_path, hub):
    tok = bastion_tokenizer()
    template = "{{ messages }}{# " + PLANTED + " #}"
    secret, _ = make_checkpoint(tmp_path / "secret", tok, trainer_state={"chat_template": template})
    code, output = publish(secret, "--repo", "alice/m", "--endpoint", hub.url, "--license", "mit",
                           env={"HF_TOKEN": TOKEN})
    assert code == 2 and "SECRET" in output
    assert hub.record.requests == []

    clean, _ = make_checkpoint(tmp_path / "clean", tok)
    code, output = publish(clean, "--repo", "alice/m", "--endpoint", hub.url, "--license", "mit", env={"HF_TOKEN": ""})
    assert code == 2 and "HF_TOKEN" in output and hub.record.requests == []
    code, output = publish(clean, "--repo", "alice/m", "--endpoint", "http://hub.example.com", "--license", "mit",
                           env={"HF_TOKEN": TOKEN})
    assert code == 2 and "https://" in output and hub.record.requests == []

    # A wrong token: the Hub's 401 comes back as one line, without the token.
    wrong = "hf_WrongTokenAbCdEfGhIjKlMnOpQrStUvWx99"
    code, output = publish(clean, "--repo", "alice/m", "--endpoint", hub.url, "--license", "mit",
                           env={"HF_TOKEN": wrong})
    assert code == 2 and "upload to" in output and "401" in output and wrong not in output

    # An existing public repo is not published into unless --public says so.
    hub.record.repos["alice/public"] = False
    code, output = publish(clean, "--repo", "alice/public", "--endpoint", hub.url, "--license", "mit",
                           env={"HF_TOKEN": TOKEN})
    assert code == 2 and "is public" in output and hub.record.commits == []
    code, output = publish(clean, "--repo", "alice/public", "--endpoint", hub.url, "--license", "mit", "--public",
                           env={"HF_TOKEN": TOKEN})
    assert code == 0, output
    assert len(hub.record.commits) == 1


def test_folder_changed_after_the_gate_is_not_uploaded(tmp_path, hub):
    from bastion.interop.hub import upload_publication

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", bastion_tokenizer())
    pub = prepare_publication(ckpt, tmp_path / "pub", PublishOptions(license="mit"))
    assert pub.cleared
    (pub.folder / "notes.txt").write_text("added after the scan")
    with pytest.raises(Exception, match="changed since the gate"):
        upload_publication(pub, "alice/m", token=TOKEN, endpoint=hub.url)
    (pub.folder / "notes.txt").unlink()
    card = pub.folder / "README.md"
    card.write_text(card.read_text() + "\nedited after the scan\n")
    with pytest.raises(Exception, match="changed since the gate scanned it"):
        upload_publication(pub, "alice/m", token=TOKEN, endpoint=hub.url)
    assert hub.record.commits == []

    refused = prepare_publication(ckpt, tmp_path / "pub2", PublishOptions())
    with pytest.raises(PublishRefused, match="no license"):
        upload_publication(refused, "alice/m", token=TOKEN, endpoint=hub.url)
