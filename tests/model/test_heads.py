"""The sequence-scoring head (model.score_labels): pooling at the last non-padding token,
the names a scoring model's checkpoint must hold, turning a language model into one."""
import pytest
import torch
from helpers import lora_test_config

from bastion.checkpoint.safetensors_check import check_against_model
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.model.heads import last_token_index, scoring_config, scoring_weights, sequence_scores

PAD = 0


def test_last_token_index_follows_transformers_rule():
    ids = torch.tensor([[5, 6, 7, PAD, PAD],   # right padding
                        [PAD, PAD, 5, 6, 7],   # left padding
                        [5, PAD, 6, PAD, PAD],  # a pad id inside: the rightmost non-pad token
                        [PAD, PAD, PAD, PAD, PAD]])  # only padding: position 0
    assert last_token_index(ids, PAD).tolist() == [2, 4, 2, 0]


def test_scores_ignore_right_padding_and_the_head_has_k_labels():
    torch.manual_seed(0)
    model = Transformer(lora_test_config(score_labels=3).model).eval()
    ids = torch.randint(1, 97, (2, 12))
    ids[1, 7:] = PAD
    with torch.no_grad():
        both = sequence_scores(model, ids, PAD)
        alone = sequence_scores(model, ids[1:, :7], PAD)
    assert both.shape == (2, 3)
    assert torch.allclose(both[1], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="no next-token loss"):
        model(ids, ids)


def test_scoring_checkpoints_must_hold_score_weight_and_lm_checkpoints_must_not():
    lm_cfg = lora_test_config().model
    rm_cfg = scoring_config(lm_cfg, 1)
    lm_state = Transformer(lm_cfg).state_dict()
    rm_state = scoring_weights(lm_state, rm_cfg, 1)
    assert "output.weight" not in rm_state and rm_state["score.weight"].abs().sum() == 0
    with torch.device("meta"):
        expected_rm, expected_lm = Transformer(rm_cfg).state_dict(), Transformer(lm_cfg).state_dict()
    check_against_model(rm_state, expected_rm, "rm")
    check_against_model(lm_state, expected_lm, "lm")
    with pytest.raises(CheckpointError, match="score.weight"):
        check_against_model({k: v for k, v in rm_state.items() if k != "score.weight"}, expected_rm, "rm")
    with pytest.raises(CheckpointError, match="score.weight"):
        check_against_model(rm_state, expected_lm, "lm")
    model = Transformer.from_state_dict(rm_cfg, rm_state)
    assert not hasattr(model, "output") and model.head is model.score
    with pytest.raises(ValueError, match="cannot generate"):
        model.decode_step([1], model.new_cache(1), [0], [0])
