"""Model folders (`leanvit export --format hub`, `train --hub`): timm loads the trained model and its evaluation
transform from them, the model card holds the measured numbers, and every command that takes a checkpoint takes one."""

import json
from pathlib import Path

import pytest
import timm
import torch

from leanvit.cli import main
from leanvit.deploy import hub as hub_module
from leanvit.deploy.bench import cpu_name
from leanvit.deploy.hub import write_model_folder
from leanvit.errors import ExportVerificationError
from leanvit.io.data import build_datasets
from leanvit.methods.glit.evolution import Budget, EvolutionSettings
from leanvit.methods.glit.search import search
from leanvit.train import TrainConfig, train
from leanvit.train.evaluation import data_config, load_trained_model, run_metadata

QUICK = dict(img_size=32, epochs=1, progress=False, threads=1)
VIT_TEACHER = {'patch_size': 8, 'embed_dim': 24, 'depth': 2, 'num_heads': 3, 'class_token': False,
               'global_pool': 'avg', 'fc_norm': False}


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[str, Path]:
    """The best checkpoint of three digits runs: SReT on labels, a compressed MiniViT student, and the GLiT
    architecture a search found, retrained."""
    root = tmp_path_factory.mktemp('runs')
    train(TrainConfig(model='sret_t', model_kwargs={'num_blocks': [1, 1, 1]}, output=str(root / 'sret'), **QUICK))
    train(TrainConfig(model='vit_tiny_patch16_224', model_kwargs=VIT_TEACHER, output=str(root / 'teacher'), **QUICK))
    assert main(['compress', '--teacher', 'vit_tiny_patch16_224', '--teacher-kwargs', json.dumps(VIT_TEACHER),
                 '--teacher-checkpoint', str(root / 'teacher' / 'best.safetensors'), '--img-size', '32',
                 '--epochs', '1', '--output', str(root / 'mini'), '--no-progress', '--threads', '1', '--hub']) == 0
    assert json.loads((root / 'mini' / 'hub' / 'config.json').read_text())['architecture'] == \
        'mini_deit_tiny_patch16_224'
    geometry = dict(patch_size=8, embed_dim=48)
    search(TrainConfig(output=str(root / 'search'), batch_size=128, model_kwargs=dict(geometry, depth=3), **QUICK),
           budget=Budget(params=100_000), settings=EvolutionSettings(population=3, parents=2, generations=2),
           calib_batches=1)
    train(TrainConfig(model='glit_custom', arch=str(root / 'search' / 'hierarchical' / 'best_arch.json'),
                      model_kwargs=geometry, output=str(root / 'glit'), **QUICK))
    return {name: root / name / 'best.safetensors' for name in ('sret', 'mini', 'glit')}


@pytest.mark.parametrize('run', ['sret', 'mini', 'glit'])
def test_timm_loads_the_trained_model_and_its_evaluation_transform(runs, run, tmp_path):
    checkpoint = runs[run]
    folder = tmp_path / 'hub'
    record = write_model_folder(checkpoint, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['hub']  # nothing left beside it
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']

    trained, name, kwargs = load_trained_model(checkpoint)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert type(loaded) is type(trained) and loaded.pretrained_cfg['architecture'] == name
    expected = trained.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(images), trained.eval()(images))

    # The run's evaluation transform, as timm resolves it from the folder, image for image.
    recorded = run_metadata(checkpoint)['config']
    bundle = build_datasets(recorded['data'], data_config(trained, kwargs.get('img_size')), seed=recorded['seed'])
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded))
    for index in (0, 7, 123):
        assert torch.equal(transform(bundle.val.images[index]), bundle.val[index][0])
    assert loaded.pretrained_cfg['label_names'] == list(bundle.class_names)

    # Its top-1 through timm's transform is the card's, and `leanvit eval --checkpoint FOLDER` gives it too.
    with torch.inference_mode():
        logits = loaded(torch.stack([transform(image) for image in bundle.val.images]))
    top1 = 100 * (logits.argmax(-1) == torch.tensor(bundle.val.labels)).float().mean().item()
    assert top1 == pytest.approx(record['metrics']['top1'])
    assert main(['eval', '--checkpoint', str(folder)]) == 0
    evaluated = json.loads((tmp_path / 'eval_hub.json').read_text())
    assert evaluated['top1'] == pytest.approx(record['metrics']['top1'])
    assert evaluated['data_source'] == 'the data the run trained on'

    card = (folder / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: timm\n')
    assert f'{record["metrics"]["top1"]:.2f} % / {record["metrics"]["top5"]:.2f} %' in card
    assert f'{record["params"]:,}' in card and f'{record["macs"]:,}' in card and cpu_name() in card
    assert f'{record["speed"]["images_per_s"]:,.0f} images/s' in card
    assert f'| epochs | {recorded["epochs"]} |' in card
    paper = {'sret': 'Sliced Recursive Transformer', 'mini': 'MiniViT', 'glit': 'GLiT'}[run]
    assert paper in card and 'CC BY 4.0' in card


def test_the_folder_uploaded_to_the_hub_loads_through_hf_hub(runs, tmp_path, monkeypatch):
    # No network here: the Hub's download returns the folder's files, as it would after
    # `huggingface-cli upload USER/NAME FOLDER`.
    import timm.models._hub as timm_hub

    folder = tmp_path / 'uploaded'
    write_model_folder(runs['glit'], folder)
    asked = []

    def download(repo_id, filename, **options):
        asked.append((repo_id, filename))
        return str(folder / filename)
    monkeypatch.setattr(timm_hub, 'hf_hub_download', download)
    loaded = timm.create_model('hf-hub:someone/glit-digits', pretrained=True).eval()
    assert asked == [('someone/glit-digits', 'config.json'), ('someone/glit-digits', 'model.safetensors')]
    trained = load_trained_model(runs['glit'])[0].eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(images), trained(images))


def test_train_hub_flag_and_commands_that_take_a_folder(runs, tmp_path, capsys):
    run = ['train', '--model', 'test_sret', '--img-size', '32', '--epochs', '1', '--no-progress', '--threads', '1',
           '--output', str(tmp_path / 'run'), '--hub']
    assert main(run) == 0
    folder = tmp_path / 'run' / 'hub'
    assert f'wrote      {folder}: timm model folder' in capsys.readouterr().out
    assert main(['export', '--checkpoint', str(folder), '--output', str(tmp_path / 'model.pt')]) == 0
    assert 'verified   max abs diff vs PyTorch' in capsys.readouterr().out
    assert main(['profile', '--checkpoint', str(folder)]) == 0
    # Written again over itself: the folder is replaced, the model card's source is the folder it was read from.
    assert main(['export', '--checkpoint', str(runs['sret']), '--format', 'hub', '--output', str(folder)]) == 0
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'sret_t' and config['leanvit']['source'] == str(runs['sret'])


def test_what_would_be_lost_or_is_crafted_is_refused_in_one_line(runs, tmp_path, capsys, monkeypatch):
    export = ['export', '--checkpoint', str(runs['sret']), '--format', 'hub', '--output']
    (tmp_path / 'file').write_text('mine')
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'cat.jpg').write_text('mine')
    (tmp_path / 'link').symlink_to(tmp_path / 'photos')
    for output, message in (('file', 'is a file'), ('photos', 'is a folder of other files'), ('link', 'is a link')):
        assert main(export + [str(tmp_path / output)]) == 2
        err = capsys.readouterr().err
        assert f'--output {tmp_path / output} {message}' in err and err.count('\n') == 1
    assert (tmp_path / 'file').read_text() == 'mine' and (tmp_path / 'photos' / 'cat.jpg').read_text() == 'mine'
    assert main(export + [str(tmp_path / 'hub'), '--quantize', 'int8']) == 2
    assert '--quantize int8 quantizes an ONNX file' in capsys.readouterr().err

    # A folder that fails its check never replaces the one there.
    folder = tmp_path / 'hub'
    write_model_folder(runs['sret'], folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disagrees(*args):
        raise ExportVerificationError('timm rebuilds another model')
    monkeypatch.setattr(hub_module, 'verify', disagrees)
    with pytest.raises(ExportVerificationError):
        write_model_folder(runs['glit'], folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file', 'hub', 'link', 'photos']

    # Crafted config.json: one line naming the file and the field, for every command.
    config = json.loads((folder / 'config.json').read_text())
    for crafted, message in (('{', 'is not JSON'), ('[1]', 'must hold a JSON object'),
                             (json.dumps(dict(config, architecture=7)), 'field "architecture" must name a model'),
                             (json.dumps(dict(config, num_classes='10')), 'field "num_classes" must be'),
                             (json.dumps(dict(config, model_args=[1])), 'field "model_args" must be a JSON object'),
                             (json.dumps(dict(config, leanvit=dict(config['leanvit'], recipe=3))),
                              'field "leanvit.recipe" must be a JSON object'),
                             ('{"architecture": "sret_t", "num_classes": 10, "x": NaN}', 'holds NaN')):
        (folder / 'config.json').write_text(crafted)
        assert main(['eval', '--checkpoint', str(folder)]) == 1
        err = capsys.readouterr().err
        assert f'{folder / "config.json"}' in err and message in err and err.count('\n') == 1, err
    (folder / 'config.json').write_text(json.dumps(config))
    (folder / 'model.safetensors').unlink()
    assert main(['eval', '--checkpoint', str(folder)]) == 1
    assert f'model folder {folder} has no model.safetensors' in capsys.readouterr().err
