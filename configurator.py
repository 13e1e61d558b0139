"""
The configuration override of nanoGPT, with checks: a script's config is its module globals; config files (plain
Python) are executed in order and may set any of them, then --key=value flags do. For example

    python train.py config/siglip_frozen.py --image_iters=200 --save_fracs=[0.5,1.0]

An unknown key is an error naming the closest known keys; a value must have its default's type (an int is fine for
a float; booleans accept True/False/true/false/1/0; a key whose default is None takes any Python literal).
"""

import ast
import difflib
import os


class ConfigError(ValueError):
    pass


def parse_value(key, text, default):
    """Turn the text of --key=text into a value of the default's type."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ('true', '1'):
            return True
        if lowered in ('false', '0'):
            return False
        raise ConfigError(f'--{key}={text}: expected a boolean (True/False/true/false/1/0)')
    if isinstance(default, str):
        return text  # strings are taken as written: --out_dir=out/run1 needs no quotes
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise ConfigError(f'--{key}={text}: expected {type(default).__name__}, like {default!r}') from None
    return check_type(key, value, default)


def check_type(key, value, default):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(default)(value)
        return type(default)([value])  # --save_fracs=1.0 means [1.0]
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f'{key}={value!r}: expected {type(default).__name__}, like {default!r}')


def unknown_key_error(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else '; run with --help to list the keys'
    return ConfigError(f'unknown config key {key!r}{hint}')


def configure(args, config):
    """Apply config files and --key=value flags from args to the dict config (a script's globals), in order."""
    known = sorted(config)
    for arg in args:
        if arg in ('-h', '--help'):
            raise SystemExit('config keys and defaults:\n' + '\n'.join(f'  {k} = {config[k]!r}' for k in known))
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise ConfigError(f'config file {arg} not found (flags are written --key=value)')
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), namespace)
            for key, value in namespace.items():
                if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
                    continue  # helpers a config file imports or defines are not settings
                if key not in config:
                    raise unknown_key_error(key, known)
                config[key] = check_type(key, value, config[key])
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            raise ConfigError(f'{arg}: flags are written --key=value')
        if key not in config:
            raise unknown_key_error(key, known)
        config[key] = parse_value(key, text, config[key])
    return config
