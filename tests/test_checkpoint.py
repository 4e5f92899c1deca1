"""Checkpoints load without executing code and save without ever leaving a broken file."""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import leanvit
import leanvit.checkpoint
from leanvit.checkpoint import unwrap_state_dict


class WritesAFile:
    """A pickle payload that would create ``path`` when unpickled, the way a malicious checkpoint runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_checkpoint_carrying_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / 'executed'
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'model': {'w': torch.zeros(1)}, 'payload': WritesAFile(marker)}, f)
    with pytest.raises(leanvit.UnsafeCheckpointError, match=r'refused to load .*evil\.pth.*could run code'):
        leanvit.read_checkpoint(tmp_path / 'evil.pth')
    assert not marker.exists()


def test_torch_save_with_a_code_object_is_refused(tmp_path):
    torch.save({'model': {'w': torch.zeros(1)}, 'fn': os.getcwd}, tmp_path / 'fn.pth')
    with pytest.raises(leanvit.UnsafeCheckpointError, match='weights-only pickles and .safetensors'):
        leanvit.read_checkpoint(tmp_path / 'fn.pth')


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'checkpoint .*absent\.pth does not exist'):
        leanvit.read_checkpoint(tmp_path / 'absent.pth')


def test_unwrap_state_dict_handles_training_wrappers():
    weights = {'a.weight': torch.ones(1)}
    assert unwrap_state_dict({'model': weights, 'epoch': 3}) == weights
    assert unwrap_state_dict({'state_dict': {'module.a.weight': torch.ones(1)}}).keys() == weights.keys()
    assert unwrap_state_dict(weights) == weights


def test_save_weights_round_trip(tmp_path):
    model = leanvit.create_model('test_sret')
    leanvit.save_weights(model, tmp_path / 'w.safetensors', metadata={'model': 'test_sret'})
    loaded = load_file(tmp_path / 'w.safetensors')
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = leanvit.create_model('test_sret')
    target = tmp_path / 'w.safetensors'
    leanvit.save_weights(model, target)
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise KeyboardInterrupt('killed mid-save')

    monkeypatch.setattr(leanvit.checkpoint, 'save_file', crash)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with pytest.raises(KeyboardInterrupt):
        leanvit.save_weights(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w.safetensors']
