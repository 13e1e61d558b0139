import pytest

from configurator import ConfigError, configure


def defaults():
    return {'learning_rate': 3e-3, 'text_iters': 100, 'compile': None, 'freeze_encoder': True,
            'save_fracs': [0.2, 1.0], 'out_dir': 'out', 'encoder': 'siglip'}


def test_flags_are_typed():
    cfg = configure(['--learning_rate=1', '--text_iters=7', '--out_dir=runs/a', '--save_fracs=[0.5,1.0]'], defaults())
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)  # an int is fine for a float
    assert cfg['text_iters'] == 7 and cfg['out_dir'] == 'runs/a' and cfg['save_fracs'] == [0.5, 1.0]


def test_list_without_brackets_and_single_value():
    assert configure(['--save_fracs=0.4,0.8'], defaults())['save_fracs'] == [0.4, 0.8]
    assert configure(['--save_fracs=1.0'], defaults())['save_fracs'] == [1.0]


@pytest.mark.parametrize('text,value', [('True', True), ('true', True), ('1', True),
                                        ('False', False), ('false', False), ('0', False)])
def test_booleans(text, value):
    assert configure([f'--freeze_encoder={text}'], defaults())['freeze_encoder'] is value


def test_bad_boolean_and_wrong_type():
    with pytest.raises(ConfigError, match='expected a boolean'):
        configure(['--freeze_encoder=maybe'], defaults())
    with pytest.raises(ConfigError, match='expected int'):
        configure(['--text_iters=1.5'], defaults())
    with pytest.raises(ConfigError, match='expected float'):
        configure(['--learning_rate=fast'], defaults())


def test_a_none_default_takes_its_declared_type():
    types = {'compile': bool}
    assert configure(['--compile=True'], defaults(), types=types)['compile'] is True
    assert configure(['--compile=false'], defaults(), types=types)['compile'] is False  # not the truthy 'false'
    assert configure(['--compile=None'], defaults(), types=types)['compile'] is None
    with pytest.raises(ConfigError, match='expected a boolean'):
        configure(['--compile=maybe'], defaults(), types=types)
    with pytest.raises(ConfigError, match='declares no type'):
        configure(['--compile=True'], defaults())


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*did you mean learning_rate"):
        configure(['--learning_rat=1e-3'], defaults())


def test_flag_without_value():
    with pytest.raises(ConfigError, match='--key=value'):
        configure(['--text_iters'], defaults())


def test_config_files_run_in_order_then_flags(tmp_path):
    a, b = tmp_path / 'a.py', tmp_path / 'b.py'
    a.write_text("import math\nencoder = 'resnet'\ntext_iters = 10\n_helper = 3\n")
    b.write_text("freeze_encoder = False\ntext_iters = 20\n")
    cfg = configure([str(a), str(b), '--text_iters=30'], defaults())
    assert (cfg['encoder'], cfg['freeze_encoder'], cfg['text_iters']) == ('resnet', False, 30)


def test_config_file_typo_and_type(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("freeze_encodr = False\n")
    with pytest.raises(ConfigError, match='did you mean freeze_encoder'):
        configure([str(bad)], defaults())
    bad.write_text("text_iters = 'many'\n")
    with pytest.raises(ConfigError, match='expected int'):
        configure([str(bad)], defaults())


def test_missing_config_file():
    with pytest.raises(ConfigError, match='config file nope.py not found'):
        configure(['nope.py'], defaults())


def test_help_prints_each_key_with_the_comment_that_documents_it(tmp_path, capsys):
    script = tmp_path / 'script.py'
    script.write_text("# a section\n\n# the learning rate,\n# at its peak\nlr = 3e-3\nsteps = 10  # how many ('#' kept)\n"
                      "name = 'a # b'\n")
    config = {'lr': 3e-3, 'steps': 10, 'name': 'a # b'}
    with pytest.raises(SystemExit) as exit_:
        configure(['--help'], config, source=str(script))
    printed = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "lr = 0.003" in printed and '# the learning rate, at its peak' in printed and 'section' not in printed
    assert "# how many ('#' kept)" in printed and "name = 'a # b'" in printed
