"""Checkpoints load without executing code and save without ever leaving a broken file; bad files are named."""

import io
import json
import os
import pickle
import random
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

import leanvit
import leanvit.io.weights
from leanvit.errors import CheckpointError, UnsafeCheckpointError
from leanvit.io.weights import check_state_dict_fits, load_checkpoint, read_checkpoint, unwrap_state_dict
from leanvit.train.teacher_logits import load_teacher_logits, save_teacher_logits


class WritesAFile:
    """A pickle payload that would create ``path`` when unpickled, the way a malicious checkpoint runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.mark.parametrize('protocol', [2, pickle.HIGHEST_PROTOCOL])
def test_checkpoint_carrying_code_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / 'executed'
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'model': {'w': torch.zeros(1)}, 'payload': WritesAFile(marker)}, f, protocol=protocol)
    with pytest.raises(leanvit.UnsafeCheckpointError, match=r'refused to load .*evil\.pth.*could run code'):
        leanvit.read_checkpoint(tmp_path / 'evil.pth')
    assert not marker.exists()


def test_torch_save_with_a_code_object_is_refused(tmp_path):
    torch.save({'model': {'w': torch.zeros(1)}, 'fn': os.getcwd}, tmp_path / 'fn.pth')
    with pytest.raises(leanvit.UnsafeCheckpointError, match='weights-only pickles and .safetensors'):
        leanvit.read_checkpoint(tmp_path / 'fn.pth')


def test_unsafe_checkpoint_error_is_the_one_of_the_error_hierarchy():
    assert leanvit.io.weights.UnsafeCheckpointError is UnsafeCheckpointError


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

    monkeypatch.setattr(leanvit.io.weights, 'save_file', crash)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    with pytest.raises(KeyboardInterrupt):
        leanvit.save_weights(model, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w.safetensors']



TENSORS = {'a': torch.arange(6.).reshape(2, 3), 'b': torch.ones(4, dtype=torch.int64)}


def safetensors_bytes(header, data: bytes = b'') -> bytes:
    """A .safetensors file's bytes: the JSON ``header``'s length (8 bytes, little-endian), the header, the data."""
    text = json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + data


def torch_save_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


F32 = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}
BAD_FILES = {
    # name: (content, or None for a folder; what the message must say)
    'header_past_end.safetensors': (struct.pack('<Q', 1000) + b'{}', 'corrupt or truncated.*invalid header length'),
    'huge_header.safetensors': (struct.pack('<Q', 2 ** 40) + b'{"a": 1}', 'corrupt or truncated.*header too large'),
    'zero_header.safetensors': (struct.pack('<Q', 0) + b'{}', 'corrupt or truncated.*invalid JSON'),
    'offsets_past_end.safetensors': (safetensors_bytes({'a': F32}, bytes(4)), 'corrupt or truncated'),
    'half.safetensors': (save(TENSORS)[:len(save(TENSORS)) // 2], 'corrupt or truncated'),
    'empty.safetensors': (b'', r'is empty \(0 bytes\)'),
    'bad_json.safetensors': (struct.pack('<Q', 5) + b'{abc}', 'corrupt or truncated.*invalid JSON'),
    'list_header.safetensors': (safetensors_bytes([1, 2]), 'corrupt or truncated.*invalid type: sequence'),
    'unknown_dtype.safetensors': (safetensors_bytes({'a': dict(F32, dtype='Q99')}, bytes(8)),
                                  'corrupt or truncated.*unknown variant `Q99`'),
    'shape_vs_offsets.safetensors': (safetensors_bytes({'a': dict(F32, shape=[3])}, bytes(8)),
                                     'corrupt or truncated.*invalid shape, data type, or offset'),
    'too_short.safetensors': (b'\x05\x00', 'corrupt or truncated.*header too small'),
    'empty.pth': (b'', r'is empty \(0 bytes\)'),
    'half.pth': (torch_save_bytes(TENSORS)[:len(torch_save_bytes(TENSORS)) // 2], 'corrupt, truncated'),
    'half_legacy.pth': (torch_save_bytes(TENSORS, _use_new_zipfile_serialization=False)[:200], 'corrupt, truncated'),
    'random_pickle.pth': (b'\x80\x02' + random.Random(0).randbytes(254), 'corrupt, truncated.*Unsupported operand'),
    'noise.pth': (bytes(range(256)), r"not a checkpoint \(corrupt, or another format\): it starts with b'\\x00"),
    'folder.pth': (None, 'is a folder, not a checkpoint file'),
}


@pytest.mark.parametrize('name', BAD_FILES)
def test_bad_file_is_named_with_what_is_wrong(tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    assert type(error.value) is CheckpointError  # not UnsafeCheckpointError: nothing here holds code
    assert str(error.value).startswith(str(path)) and '\n' not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


def test_format_is_told_by_content_not_by_name(tmp_path):
    (tmp_path / 'weights.pth').write_bytes(save(TENSORS))
    loaded = read_checkpoint(tmp_path / 'weights.pth')
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    # A .safetensors name promises no pickle, so a torch.save under that name is named, not unpickled.
    (tmp_path / 'weights.safetensors').write_bytes(torch_save_bytes(TENSORS))
    with pytest.raises(CheckpointError, match=r'weights\.safetensors is named \.safetensors but is a PyTorch zip'):
        read_checkpoint(tmp_path / 'weights.safetensors')


@pytest.mark.parametrize('zip_format', [True, False])
def test_torch_save_of_a_state_dict_loads(tmp_path, zip_format):
    torch.save({'model': TENSORS, 'epoch': 3}, tmp_path / 'ckpt.pth', _use_new_zipfile_serialization=zip_format)
    loaded = unwrap_state_dict(read_checkpoint(tmp_path / 'ckpt.pth'))
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())


@pytest.mark.parametrize('content, held', [([torch.ones(1), torch.ones(2)], 'a list of 2 items'),
                                           (torch.ones(3), r'a tensor of shape \(3,\)')])
def test_checkpoint_that_is_not_a_dict_is_named(tmp_path, content, held):
    torch.save(content, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match=rf'odd\.pth holds {held}, not a dict of tensors'):
        load_checkpoint(nn.Linear(2, 2), tmp_path / 'odd.pth')


def test_state_dict_with_other_values_than_tensors_is_named(tmp_path):
    model = nn.Linear(2, 2)
    torch.save(dict(model.state_dict(), epoch=3, note='best'), tmp_path / 'mixed.pth')
    with pytest.raises(CheckpointError, match=r"mixed\.pth is not a state dict of tensors: 2 of its 4 entries are "
                                              r"not \(e\.g\. 'epoch': an int; 'note': a str\)"):
        load_checkpoint(model, tmp_path / 'mixed.pth')
    with pytest.raises(CheckpointError, match=r"given is not a state dict of tensors: 1 of its 2 entries.*'bias': a "
                                              r'list of 2 items'):
        check_state_dict_fits(model, {'weight': torch.zeros(2, 2), 'bias': [0., 0.]}, source='given')
    torch.save({'weight': torch.zeros(3, 2), 'bias': torch.zeros(2)}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match=r'other\.pth does not fit model Linear: 1 shapes differ \(e\.g\. weight: '
                                              r'checkpoint \(3, 2\) vs model \(2, 2\)\)'):
        load_checkpoint(model, tmp_path / 'other.pth')


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files whatever their permissions')
def test_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / 'private.safetensors'
    path.write_bytes(save(TENSORS))
    path.chmod(0)
    with pytest.raises(PermissionError, match=r'private\.safetensors'):
        read_checkpoint(path)


TEACHER_LOGITS_MUST_BE = 'teacher logits must be a .safetensors file written by `leanvit teacher-logits`'


@pytest.mark.parametrize('name, write, problem', [
    ('pickled.pth', lambda p: torch.save({'logits': torch.zeros(3, 2)}, p),
     r'is a PyTorch zip checkpoint \(torch\.save\), not a \.safetensors file'),
    ('other.safetensors', lambda p: save_file({'x': torch.zeros(3, 2)}, p), r'holds no tensor "logits" .*x\)'),
    ('flat.safetensors', lambda p: save_file({'logits': torch.zeros(6)}, p),
     r'holds "logits" of shape \(6,\) and dtype torch\.float32, not 2-D floats'),
    ('labels.safetensors', lambda p: save_file({'logits': torch.zeros(3, 2, dtype=torch.int64)}, p),
     r'dtype torch\.int64, not 2-D floats'),
    ('bad_metadata.safetensors', lambda p: save_file({'logits': torch.zeros(3, 2)}, p, metadata={'leanvit': '{'}),
     r'has metadata "leanvit" that is not valid JSON'),
    ('half.safetensors', lambda p: p.write_bytes(save({'logits': torch.zeros(3, 2)})[:50]), 'corrupt or truncated'),
    ('folder', lambda p: p.mkdir(), 'is a folder'),
])
def test_bad_teacher_logits_are_named_with_what_was_expected(tmp_path, name, write, problem):
    write(tmp_path / name)
    with pytest.raises(CheckpointError) as error:
        load_teacher_logits(tmp_path / name, 3, 2)
    message = str(error.value)
    assert message.startswith(str(tmp_path / name)) and '\n' not in message
    assert re.search(problem, message) and TEACHER_LOGITS_MUST_BE in message, message


def test_teacher_logits_round_trip_and_missing_file(tmp_path):
    save_teacher_logits(tmp_path / 'logits.safetensors', torch.arange(6.).reshape(3, 2), dict(data='digits'))
    logits, metadata = load_teacher_logits(tmp_path / 'logits.safetensors', 3, 2)
    assert torch.equal(logits, torch.arange(6.).reshape(3, 2)) and metadata == dict(data='digits')
    with pytest.raises(FileNotFoundError, match=r'teacher logits .*absent\.safetensors do not exist; expected a '
                                                r'\.safetensors file written by `leanvit teacher-logits`'):
        load_teacher_logits(tmp_path / 'absent.safetensors', 3, 2)


def test_a_deit_style_checkpoint_with_args_and_numpy_scalars_loads_weights_only(tmp_path):
    import argparse

    import numpy as np

    model = nn.Linear(3, 2)
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(lr=5e-4, model='deit_tiny', drop=[0.1]),
                'max_accuracy': np.float64(72.2), 'epoch': np.int64(299), 'dtype': np.dtype('float32'),
                'curve': np.arange(3.)}, tmp_path / 'deit.pth')
    checkpoint = read_checkpoint(tmp_path / 'deit.pth')
    assert checkpoint['args'] == argparse.Namespace(lr=5e-4, model='deit_tiny', drop=[0.1])
    assert (checkpoint['max_accuracy'], checkpoint['epoch'], checkpoint['dtype']) == (72.2, 299, np.float32)
    loaded = load_checkpoint(nn.Linear(3, 2), tmp_path / 'deit.pth')
    assert torch.equal(loaded.weight, model.weight)


def test_trust_unpickles_fully_with_a_warning_and_only_when_asked(tmp_path):
    marker = tmp_path / 'executed'
    torch.save({'w': torch.zeros(1), 'payload': WritesAFile(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='--trust-checkpoint'):
        read_checkpoint(tmp_path / 'evil.pth')
    assert not marker.exists()
    with pytest.warns(UserWarning, match=r'unpickling .*evil\.pth fully \(trusted\)'):
        checkpoint = read_checkpoint(tmp_path / 'evil.pth', trust=True)
    assert marker.exists() and torch.equal(checkpoint['w'], torch.zeros(1))


def test_pretrained_weights_that_carry_code_are_one_error_naming_the_file(tmp_path):
    marker = tmp_path / 'executed'
    with open(tmp_path / 'evil.pth', 'wb') as f:
        pickle.dump({'model': {'w': torch.zeros(1)}, 'payload': WritesAFile(marker)}, f)
    with pytest.raises(UnsafeCheckpointError) as error:
        leanvit.create_model('test_sret', pretrained=True, pretrained_cfg_overlay={'file': str(tmp_path / 'evil.pth')})
    message = str(error.value)
    assert f'refused to load the weights of test_sret ({tmp_path / "evil.pth"}' in message
    assert 'Remove pretrained' in message and 'trust=True' in message and '\n' not in message
    assert not marker.exists()
