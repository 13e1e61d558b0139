"""
The configuration override of nanoGPT, with checks, used by every script: a script's config is its module globals;
config files (plain Python) are executed in order and may set any of them, then --key=value flags do. For example

    python train.py config/siglip_frozen.py --image_iters=200 --save_fracs=[0.5,1.0]
    python train.py --help          # every key with its default and the comment beside it in the script

An unknown key is an error naming the closest known keys; a value must have its default's type (an int is fine for
a float; booleans accept True/False/true/false/1/0); a key whose default is None takes the type the script declares
for it. check_ranges then holds every number to its range before any compute.
"""

import ast
import dataclasses
import difflib
import io
import math
import os
import pprint
import textwrap
import tokenize


class ConfigError(ValueError):
    pass


MAX_CONFIG_BYTES = 2 ** 20  # a config file is a few lines of Python


def parse_value(key, text, default, declared=None):
    """Turn the text of --key=text into a value of the default's type (or the declared type, for a None default)."""
    if isinstance(default, bool) or declared is bool:
        lowered = text.lower()
        if lowered in ('true', '1'):
            return True
        if lowered in ('false', '0'):
            return False
        if declared is bool and lowered == 'none':
            return None
        raise ConfigError(f'--{key}={text}: expected a boolean (True/False/true/false/1/0)')
    if isinstance(default, str):
        return text  # strings are taken as written: --out_dir=out/run1 needs no quotes
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f'--{key}={text}: expected {type_name(default, declared)}, like {default!r}') from None
    return check_type(key, value, default, declared)


def type_name(default, declared):
    return declared.__name__ if default is None and declared else type(default).__name__


def check_type(key, value, default, declared=None):
    """value as a value of key: the default's type (an int widened to float; one value for a list is a list of one)."""
    if value is None and default is None:
        return value
    like = declared() if default is None and declared else default  # a None default: an instance of its type
    if like is None:
        raise ConfigError(f'{key}: its default is None and the script declares no type for it')
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(like, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(like, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(like, (list, tuple)):
        items = value if isinstance(value, (list, tuple)) else [value]  # --save_fracs=1.0 means [1.0]
        if like and not isinstance(like[0], (list, tuple, dict)):  # a list of numbers stays a list of numbers
            items = [check_type(f'{key}[{i}]', v, like[0]) for i, v in enumerate(items)]
        return type(like)(items)
    elif isinstance(like, dict):
        if isinstance(value, dict):
            return value
    elif isinstance(value, type(like)):
        return value
    raise ConfigError(f'{key}={value!r}: expected {type_name(default, declared)}, like {default!r}')


def unknown_key_error(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else '; run with --help to list the keys'
    return ConfigError(f'unknown config key {key!r}{hint}')


def key_comments(source):
    """
    {key: its documentation} for the lines `key = value  # comment` of a script's source file: the comment beside a
    key and the comment lines that continue it (directly below, up to a blank line or the next key), or, for a key
    with no comment beside it, the comment lines right above it. A line of dashes separates sections.
    """
    comments, above, key, inline, continues = {}, [], None, False, None
    with open(source) as f:
        text = f.read()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        line_comment = tok.type == tokenize.COMMENT and tok.start[1] == 0
        if line_comment and tok.string.strip('#- ') == '' and '-' in tok.string:
            above, continues = [], None  # a section rule
        elif line_comment and continues:
            comments[continues] += ' ' + tok.string.lstrip('# ')
        elif line_comment:
            above.append(tok.string.lstrip('# '))
        elif tok.type == tokenize.NAME and tok.start[1] == 0 and key is None:
            key, block, above, inline, continues = tok.string, ' '.join(above), [], False, None
        elif tok.type == tokenize.COMMENT and key and not inline:
            comments[key], inline = tok.string.lstrip('# '), True
        elif tok.type == tokenize.NEWLINE:
            if key and not inline and block:
                comments[key] = block
            continues, key = (key if inline else None), None
        elif tok.type == tokenize.NL and tok.line.strip() == '':
            above, continues = [], None  # a blank line: what is above it is not about the next key
    return comments


def help_text(config, source=None, width=132):
    """Every key, its default and its documentation (key_comments), the comments aligned and wrapped to width."""
    comments = key_comments(source) if source else {}
    column = 36
    lines = ['config keys, their defaults and what they do (set them in a config file or as --key=value):']
    for k, v in config.items():
        head = f'  {k} = {v!r}'
        if len(head) > width:  # a long default (a grid) over lines of its own, aligned after `key = `
            prefix = f'  {k} = '
            head = prefix + pprint.pformat(v, width=width - len(prefix)).replace('\n', '\n' + ' ' * len(prefix))
        doc = textwrap.wrap(comments.get(k, ''), width - column - 2) or ['']
        last = head.split('\n')[-1]
        if len(last) + 2 > column:  # no room beside it: the comment goes below, at the column
            lines.append(head)
            lines += [' ' * column + f'# {d}' for d in doc if d]
        else:
            lines.append((head.ljust(column) if '\n' not in head else head + ' ' * (column - len(last))) +
                         (f'# {doc[0]}' if doc[0] else ''))
            lines += [' ' * column + f'# {d}' for d in doc[1:]]
    return '\n'.join(line.rstrip() for line in lines)


def config_class(name, config, types=None):
    """
    A dataclass of a script's config keys (script_config), each typed by its default or, for a None default, by
    types: a run's config is an instance, config_class(...)(**configure(...)), so it names every key it has.
    """
    types = types or {}
    return dataclasses.make_dataclass(name, [(k, types[k] if v is None and k in types else type(v))
                                             for k, v in config.items()])


def script_config(namespace):
    """A script's config: its lowercase module globals of plain types (the keys of its config section)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and k.islower() and isinstance(v, (int, float, bool, str, list, dict, type(None)))}


def configure(args, config, source=None, types=None):
    """
    Apply config files and --key=value flags from args to the dict config (a script's globals), in order. source:
    the script's file, whose comments --help prints; types: {key: type} for the keys whose default is None.
    """
    known, types = sorted(config), types or {}
    for arg in args:
        if arg in ('-h', '--help'):
            print(help_text(config, source))
            raise SystemExit(0)
        if not arg.startswith('--'):
            if not os.path.exists(arg):
                raise ConfigError(f'config file {arg} not found (flags are written --key=value)')
            if not os.path.isfile(arg):  # a FIFO would block the read, /dev/zero never end it
                raise ConfigError(f'config file {arg} is not a regular file')
            if os.path.getsize(arg) > MAX_CONFIG_BYTES:
                raise ConfigError(f'config file {arg} is larger than {MAX_CONFIG_BYTES:,} bytes: not a config file')
            namespace = {}
            with open(arg) as f:
                exec(compile(f.read(MAX_CONFIG_BYTES + 1), arg, 'exec'), namespace)
            for key, value in namespace.items():
                if key.startswith('_') or callable(value) or type(value).__name__ == 'module':
                    continue  # helpers a config file imports or defines are not settings
                if key not in config:
                    raise unknown_key_error(key, known)
                config[key] = check_type(key, value, config[key], types.get(key))
            continue
        key, sep, text = arg[2:].partition('=')
        if not sep:
            raise ConfigError(f'{arg}: flags are written --key=value')
        if key not in config:
            raise unknown_key_error(key, known)
        config[key] = parse_value(key, text, config[key], types.get(key))
    return config


def check_ranges(config, ranges, choices=None):
    """
    Every number in config (and in its lists of numbers) must be finite and in its range: ranges maps a key to an
    interval written '(0, 1]', '[0, 1)', '> 0', '>= 0 and <= 100' ...; a key not in ranges must be >= 0. choices
    maps a key to the values it may take. Raises ConfigError naming the key.
    """
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise ConfigError(f'{key}={config[key]!r}: use one of {", ".join(allowed)}')
    for key, value in config.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rule = ranges.get(key, '>= 0')
            finite = isinstance(v, int) or math.isfinite(v)  # an int of 400 digits is finite, and no float
            if not finite or not in_range(v, rule):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + '...'
                raise ConfigError(f'{key}={shown}: must be {"finite and " if not finite else ""}'
                                  f'{rule if rule[0] not in "[(" else "in " + rule}')


def in_range(v, rule):
    if ' and ' in rule:  # '> 0 and <= 1000000000': every part holds
        return all(in_range(v, part) for part in rule.split(' and '))
    if rule.startswith(('>', '<')):
        op, bound = rule.split()
        bound = float(bound)
        return {'>': v > bound, '>=': v >= bound, '<': v < bound, '<=': v <= bound}[op]
    lo, hi = (float(x) for x in rule[1:-1].split(','))
    return (lo <= v if rule[0] == '[' else lo < v) and (v <= hi if rule[-1] == ']' else v < hi)
