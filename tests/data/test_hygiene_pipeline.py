"""`data prepare` with every hygiene step on (the default): what reaches the shards."""
import json
import random

from bastion.config.schema import DataConfig
from bastion.data import prepare_dataset
from bastion.data.shards import TokenShards, read_tokenizer_json
from bastion.tokenizer import BastionTokenizer

SECRET = "AKIAIOSFODNN7EXAMPLE"
CARD = "4111 1111 1111 1111"
FAILOVER_IP = "93.184.216.34"
PROSE = ("The committee met on Tuesday to review the harbour plans. Members discussed the budget, "
         "the timeline for dredging, and the new ferry schedule that starts in spring. ")


WORDS = ("harbour ferry budget river council tide crane dock ledger permit vessel cargo timber "
         "lantern signal anchor bridge canal market quarry meadow orchard mill forge").split()


def prose(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def decoded_corpus(out):
    tok = BastionTokenizer.from_json_str(read_tokenizer_json(out))
    text = ""
    for split in ("train", "val"):
        shards = TokenShards(out, split)
        text += tok.decode(shards.read(0, shards.num_tokens).tolist())
    return text


def test_secrets_redacted_near_duplicates_and_junk_dropped(tmp_path):
    docs = [f"Report {i}: " + prose(i) for i in range(20)]
    docs.append(f"Deploy notes: aws_access_key_id = {SECRET}\ncontact ops@example.com, card {CARD}.\n"
                f"The DNS server failed over to the resolver {FAILOVER_IP}.")
    words = docs[0].split()
    words[10:13] = ["edited", "by", "hand"]
    docs.append(" ".join(words))  # a near-duplicate of document 0 (3 words of 300 changed)
    docs.append(docs[1])  # an exact duplicate
    docs.append("\x00\x01\x02\x03" * 50)  # binary junk: non-text filter
    docs.append("same line\n" * 40)  # repeated lines
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    before = src.read_bytes()
    cfg = DataConfig(sources=[str(src)], output_dir=str(tmp_path / "out"), allowed_roots=[str(tmp_path)],
                     val_fraction=0.1, tokenizer={"vocab_size": 400})
    report = prepare_dataset(cfg)
    assert report.duplicates_dropped == 1
    assert report.near_duplicates_dropped == 1 and report.near_duplicate_clusters == 1
    assert report.filtered == {"non_text": 1, "repeated_lines": 1}
    assert report.redactions["SECRET"] >= 1 and report.redactions["EMAIL"] == 1 and report.redactions["CREDIT_CARD"] == 1
    assert report.redactions["IP"] == 1
    assert report.documents == len(docs) - 4
    corpus = decoded_corpus(tmp_path / "out")
    assert SECRET not in corpus and "ops@example.com" not in corpus and CARD not in corpus and FAILOVER_IP not in corpus
    assert "<SECRET>" in corpus and "<EMAIL>" in corpus
    assert src.read_bytes() == before  # sources are never modified
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["redactions"] == report.redactions


def test_each_step_can_be_switched_off(tmp_path):
    src = tmp_path / "a.jsonl"
    docs = [f"mail me at person{i}@example.org about " + PROSE for i in range(5)] * 2
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(sources=[str(src)], output_dir=str(tmp_path / "out"), allowed_roots=[str(tmp_path)],
                     val_fraction=0.0, tokenizer={"vocab_size": 300},
                     sanitize={"enabled": False}, dedup={"exact": False, "near": False})
    report = prepare_dataset(cfg)
    assert report.documents == 10 and report.redactions == {} and report.duplicates_dropped == 0
    assert "person0@example.org" in decoded_corpus(tmp_path / "out")
