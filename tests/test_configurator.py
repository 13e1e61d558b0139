import importlib

import pytest

from configurator import ConfigError, configure, help_text, script_config


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


def test_a_comment_continued_below_its_key_stays_with_it(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text("# ----------\n# config\nruns = ''  # where each run goes, beside its\n# cell.json\n\n"
                      "# the grid: every cell\ngrid = [1, 2]\nseeds = [1]  # how many\n# ----------\n")
    from configurator import key_comments
    assert key_comments(str(script)) == {'runs': "where each run goes, beside its cell.json",
                                         'grid': 'the grid: every cell', 'seeds': 'how many'}


@pytest.mark.parametrize('script', ['train', 'ablate', 'eval'])
def test_the_scripts_help_is_readable(script):
    """No line over 160 characters; every key documented, its whole comment beside it, none mixed with another's."""
    module = importlib.import_module(script)
    printed = help_text(script_config(vars(module)), module.__file__)  # what `python SCRIPT.py --help` prints
    lines = printed.splitlines()[1:]
    assert lines and max(len(line) for line in lines) <= 160
    blocks = {}  # key -> its lines: the key's own, then the indented ones below it
    for line in lines:
        if line.startswith('  ') and line[2] != ' ':
            key = line.split(' = ')[0].strip()
            blocks[key] = [line]
        else:
            blocks[key].append(line)
    documented = {k: ' '.join(l.split('# ', 1)[1] for l in block if '# ' in l) for k, block in blocks.items()}
    assert [k for k, doc in documented.items() if not doc] == []
    if script == 'ablate':  # a comment continued below its key, and the next key's own
        assert documented['runs_dir'].endswith('under any name, is that run')
        assert documented['grid'].startswith('the grid: every combination')
