"""
Real image data: image files decoded defensively, and WebDataset tar shards (img2dataset's layout) of image-caption
pairs.

    from images import decode_image, read_shard
    pixels = decode_image(open('cat.jpg', 'rb').read(), size=384)      # uint8 [384, 384, 3], or raises BadImage
    pairs, skipped = read_shard('shard-00000.tar', size=384)          # [(key, pixels, caption)], Counter of reasons

What comes off the web is hostile: grayscale, CMYK, palette and 16-bit images are converted to 8-bit RGB, transparent
ones composited on white; truncated, unreadable, tiny (a side under MIN_SIDE) and huge (decompression bombs, over
MAX_PIXELS, refused before decoding) ones are skipped. A skip is never silent: every reader returns a Counter of
reasons that the training log reports.
"""

import io
import os
import tarfile
from collections import Counter

import numpy as np

MIN_SIDE = 8  # pixels: smaller images (tracking pixels, 1x1 spacers) carry nothing to caption
MAX_PIXELS = 64 * 2 ** 20  # width x height above this is refused from the header alone, before any decoding
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


class BadImage(ValueError):
    """An image that cannot be used; str(e) is the reason, the key the skip counters use."""


def decode_image(raw, size):
    """
    Encoded image bytes -> uint8 [size, size, 3]: converted to 8-bit RGB, padded to a square with white (nothing
    cropped away: a caption may mention anything in the picture), resized with antialiasing. Raises BadImage.
    """
    from PIL import Image  # Pillow comes with timm's torchvision

    try:
        img = Image.open(io.BytesIO(raw))
    except Exception:
        raise BadImage('not an image')
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadImage('too large')
    if min(w, h) < MIN_SIDE:
        raise BadImage('too small')
    try:
        img.load()
    except Exception:  # truncated data, a broken stream
        raise BadImage('truncated or corrupt')
    img = to_rgb(img)
    side = max(w, h)
    square = Image.new('RGB', (side, side), (255, 255, 255))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    return np.array(square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.uint8)


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped) to 8, transparency composited on white."""
    from PIL import Image

    if img.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):  # 16-bit (or float) grayscale: rescale its range to 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == 'F' else 65535.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    if img.mode in ('RGBA', 'LA', 'La', 'RGBa'):
        rgba = img.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert('RGB')


def shard_samples(path, caption_key='txt'):
    """
    The samples of a WebDataset tar: files grouped by key (the name up to its first dot, as img2dataset writes
    00000/000000012.jpg + .txt + .json). Yields (key, image bytes or None, caption or None); the caption is the .txt
    file, or the field caption_key of the .json when caption_key is not 'txt'.
    """
    import json

    def sample(key, files):
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        caption = None
        if caption_key == 'txt' and 'txt' in files:
            caption = files['txt'].decode('utf-8', errors='replace').strip()
        elif caption_key != 'txt' and 'json' in files:
            try:
                caption = json.loads(files['json']).get(caption_key)
            except ValueError:
                caption = None
        return key, image, caption or None

    key, files = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            base = os.path.basename(name)
            k, _, ext = base.partition('.')
            k = os.path.join(os.path.dirname(name), k)
            if k != key and key is not None:
                yield sample(key, files)
                files = {}
            key = k
            files[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield sample(key, files)


def read_shard(path, size, caption_key='txt'):
    """
    Every usable (key, pixels, caption) of one tar shard, and a Counter of the samples skipped, by reason ('no
    caption', 'no image', and decode_image's). A shard with no samples at all is an error that names it.
    """
    pairs, skipped, n = [], Counter(), 0
    try:
        for key, raw, caption in shard_samples(path, caption_key):
            n += 1
            if raw is None:
                skipped['no image'] += 1
            elif caption is None:
                skipped['no caption'] += 1
            else:
                try:
                    pairs.append((key, decode_image(raw, size), caption))
                except BadImage as e:
                    skipped[str(e)] += 1
    except tarfile.TarError as e:
        raise ValueError(f'{path} is not a readable tar shard ({e})') from e
    if n == 0:
        raise ValueError(f'{path} holds no samples: an empty shard (check how it was written)')
    return pairs, skipped


def llava_conversations(path, images_dir):
    """
    The records of a LLaVA instruction file (llava_v1_5_mix665k.json and its kind): a list of
    {"image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
    {"from": "gpt", "value": "..."}, ...]}. Returns [(image path or None, [(question, answer), ...])] and a Counter
    of the records skipped, by reason: turns that do not alternate human / gpt, an image without its <image> mark or a
    mark without an image. A text-only record (no "image") is kept: LLaVA mixes them in to keep the LM's text skills.
    """
    import json

    with open(path) as f:
        records = json.load(f)
    if not records:
        raise ValueError(f'{path} holds no conversations')
    kept, skipped = [], Counter()
    for r in records:
        turns = r.get('conversations') or []
        roles = [t.get('from') for t in turns]
        if not turns or len(turns) % 2 or roles != ['human', 'gpt'] * (len(turns) // 2):
            skipped['turns not human / gpt pairs'] += 1
            continue
        marks = sum(t['value'].count('<image>') for t in turns)
        if 'image' in r and marks != 1:
            skipped['image without one <image> mark'] += 1
        elif 'image' not in r and marks:
            skipped['<image> mark without an image'] += 1
        else:
            image = os.path.join(images_dir, r['image']) if 'image' in r else None
            kept.append((image, [(q['value'], a['value']) for q, a in zip(turns[::2], turns[1::2])]))
    return kept, skipped


def llava_sample(enc, turns, n_image_tokens):
    """
    A LLaVA conversation in the demo's chat format, <|user|> question <|assistant|> answer <|endoftext|> per turn,
    with n_image_tokens <|image|> tokens where the literal <image> stands; the loss mask covers the answers and their
    end tokens only. Returns (tokens, mask).
    """
    import data

    user, assistant, eot, image = (data.special_id(enc, t) for t in
                                   ('<|user|>', '<|assistant|>', '<|endoftext|>', '<|image|>'))
    tokens, mask = [], []
    for question, answer in turns:
        before, mark, after = question.partition('<image>')
        prompt = [user] + enc.encode_ordinary(before)
        if mark:
            prompt += [image] * n_image_tokens
        prompt += enc.encode_ordinary(after) + [assistant]
        reply = enc.encode_ordinary(answer) + [eot]
        tokens += prompt + reply
        mask += [False] * len(prompt) + [True] * len(reply)
    return tokens, mask
