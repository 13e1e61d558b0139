"""
Real image data: image files decoded defensively, and WebDataset tar shards (img2dataset's layout) of image-caption
pairs.

    from images import decode_image, read_shard
    pixels = decode_image(open('cat.jpg', 'rb').read(), size=384)      # uint8 [384, 384, 3], or raises BadImage
    pairs, skipped = read_shard('shard-00000.tar', size=384)          # [(key, pixels, caption)], Counter of reasons
    source = RealImages(384, image_data='datacomp/*.tar', instruct_data='llava/mix665k.json')  # what train.py reads

What comes off the web is hostile: grayscale, CMYK, palette and 16-bit images are converted to 8-bit RGB, transparent
ones composited on white; truncated, unreadable, tiny (a side under MIN_SIDE), huge (decompression bombs, over
MAX_PIXELS, refused before decoding) and thin (a side over MAX_ASPECT times the other) ones are skipped. An image path
that a record names is confined to its folder (symlinks resolved), read only when it is a regular file, and at most
MAX_IMAGE_BYTES of it; a caption is at most MAX_CAPTION_BYTES. A skip is never silent: every reader returns a Counter
of reasons that the training log reports. Memory stays bounded whatever a file claims.
"""

import io
import json
import os
import random
import stat
import tarfile
from collections import Counter

import numpy as np

import data
import shapes

MIN_SIDE = 8  # pixels: smaller images (tracking pixels, 1x1 spacers) carry nothing to caption
MAX_PIXELS = 64 * 2 ** 20  # width x height above this is refused from the header alone, before any decoding
MAX_ASPECT = 20  # a longer side over 20 times the shorter: a banner or a spacer, nothing left at the encoder's size
MAX_IMAGE_BYTES = 64 * 2 ** 20  # an image file is read up to this many bytes; a larger one is refused
MAX_CAPTION_BYTES = 64 * 2 ** 10  # a caption file over this is refused unread (a web caption is under 1 KB)
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


class BadImage(ValueError):
    """An image that cannot be used; str(e) is the reason, the key the skip counters use."""


def decode_image(raw, size):
    """
    Encoded image bytes -> uint8 [size, size, 3]: converted to 8-bit RGB, resized with antialiasing so that its
    longer side is `size`, then padded to a square with white (nothing cropped away: a caption may mention anything
    in the picture). Resizing first bounds the memory: the padded canvas is never larger than size x size.
    Raises BadImage.
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
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadImage('extreme aspect ratio')
    try:
        img.load()
    except Exception:  # truncated data, a broken stream
        raise BadImage('truncated or corrupt')
    scale = size / max(w, h)
    fit = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = to_rgb(img).resize(fit, Image.Resampling.BICUBIC, reducing_gap=3.0)
    square = Image.new('RGB', (size, size), (255, 255, 255))
    square.paste(img, ((size - fit[0]) // 2, (size - fit[1]) // 2))
    return np.array(square, dtype=np.uint8)


def read_image_file(path, folder, max_bytes=MAX_IMAGE_BYTES):
    """
    The bytes of an image file that a record names, confined to folder: resolved (symlinks included) it must lie
    inside folder, be a regular file (not a FIFO, a device such as /dev/zero, or a folder) and hold at most max_bytes.
    Raises BadImage with the reason, which the skip counters use.
    """
    try:
        real, root = os.path.realpath(path), os.path.realpath(folder)
    except ValueError:  # a NUL byte in the name
        raise BadImage('unusable file name') from None
    if os.path.commonpath([real, root]) != root:
        raise BadImage('outside its folder')
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opened without O_NONBLOCK would wait for a writer
    except FileNotFoundError:
        raise BadImage('missing file')
    except OSError:
        raise BadImage('unreadable file')
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder (an empty name is its record's folder), a FIFO, a device
        os.close(fd)
        raise BadImage('not a regular file')
    with os.fdopen(fd, 'rb') as f:
        st = os.fstat(f.fileno())
        if st.st_size > max_bytes:
            raise BadImage('file too large')
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise BadImage('file too large')
    return raw


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


TOO_LARGE = object()  # a caption left unread


def index_shard(path, caption_key='txt'):
    """
    Where the samples of one WebDataset tar lie: files grouped by key (the name up to its first dot, as img2dataset
    writes 00000/000000012.jpg + .txt + .json). Returns the keys, an int64 array [n, 4] (image offset, image size,
    caption offset, caption size: byte ranges of the tar, read back by read_range) and a Counter of the samples
    without an image or a caption, or with a caption over MAX_CAPTION_BYTES. The caption is the .txt file, or the
    field caption_key of the .json when caption_key is not 'txt'. Only the captions are read: the image bytes are
    skipped over. A compressed tar is an error: its byte ranges could not be read back.
    """
    keys, rows, skipped = [], [], Counter()
    field = 'txt' if caption_key == 'txt' else 'json'

    def close(key, files, caption):
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            skipped['no image'] += 1
        elif caption is TOO_LARGE:
            skipped['caption too large'] += 1
        elif caption is None or not caption_text(caption, caption_key):
            skipped['no caption'] += 1
        else:
            keys.append(key)
            rows.append(image + files[field])

    with open(path, 'rb') as f:
        magic = f.read(4)
    for prefix, kind in ((b'\x1f\x8b', 'gzip'), (b'BZh', 'bzip2'), (b'\xfd7zX', 'xz'), (b'\x28\xb5\x2f\xfd', 'zstd')):
        if magic.startswith(prefix):
            raise ValueError(f'{path} is {kind}-compressed: image shards are read by random access into a plain tar '
                             f'(img2dataset writes them so); decompress it first')
    key, files, caption, n = None, {}, None, 0
    try:
        with tarfile.open(path, 'r:') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                k, _, ext = base.partition('.')
                k = os.path.join(os.path.dirname(member.name), k)
                if k != key and key is not None:
                    close(key, files, caption)
                    n += 1
                    files, caption = {}, None
                key, ext = k, ext.lower()
                files[ext] = (member.offset_data, member.size)
                if ext == field:  # read while the tar is open: the caption decides whether the sample is kept
                    caption = TOO_LARGE if member.size > MAX_CAPTION_BYTES else tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ValueError(f'{path} is not a readable tar shard ({e})') from e
    if key is not None:
        close(key, files, caption)
        n += 1
    if n == 0:
        raise ValueError(f'{path} holds no samples: an empty shard (check how it was written)')
    return keys, np.array(rows, dtype=np.int64).reshape(-1, 4), skipped


def read_range(path, offset, size):
    with open(path, 'rb') as f:
        f.seek(offset)
        return f.read(size)


def caption_text(raw, caption_key='txt'):
    """A caption file's bytes -> its text, or None when it has none (empty, or the .json lacks the field)."""
    if caption_key == 'txt':
        return raw.decode('utf-8', errors='replace').strip() or None
    try:
        value = json.loads(raw).get(caption_key)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value.strip() or None if isinstance(value, str) else None


def read_shard(path, size, caption_key='txt'):
    """
    Every usable (key, pixels, caption) of one tar shard, and a Counter of the samples skipped, by reason ('no
    caption', 'no image', and decode_image's). A shard with no samples at all is an error that names it.
    """
    keys, ranges, skipped = index_shard(path, caption_key)
    pairs = []
    for key, (image_at, image_size, caption_at, caption_size) in zip(keys, ranges.tolist()):
        try:
            pixels = decode_image(read_range(path, image_at, image_size), size)
        except BadImage as e:
            skipped[str(e)] += 1
            continue
        pairs.append((key, pixels, caption_text(read_range(path, caption_at, caption_size), caption_key)))
    return pairs, skipped


def llava_conversations(path, images_dir):
    """
    The records of a LLaVA instruction file (llava_v1_5_mix665k.json and its kind): a list of
    {"image": "coco/train2017/x.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat ..."},
    {"from": "gpt", "value": "..."}, ...]}. Returns [(image path or None, [(question, answer), ...])] and a Counter
    of the records skipped, by reason: a record of the wrong shape or types, turns that do not alternate human / gpt,
    an image without its <image> mark or a mark without an image. A text-only record (no "image") is kept: LLaVA
    mixes them in to keep the LM's text skills. The image paths are read later, confined to images_dir.
    """
    records = data.read_json(path)
    if not isinstance(records, list) or not records:
        raise ValueError(f'{path}: expected a non-empty JSON list of conversation records, found '
                         f'{type(records).__name__ if records else "an empty list"}')
    kept, skipped = [], Counter()
    for r in records:
        turns = r.get('conversations') if isinstance(r, dict) else None
        if not (isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get('value'), str) for t in turns)
                and isinstance(r.get('image', ''), str)):
            skipped['malformed record'] += 1
            continue
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
    A LLaVA conversation in the chat format (data.chat_sample): the image's tokens first, wherever the record's
    literal <image> mark stood (LLaVA puts it at the start or the end of the first question), so that fine-tuning on
    LLaVA data and every benchmark prompt (data.question_prompt) put the image in the same place. Returns
    (tokens, mask); n_image_tokens is 0 for a text-only record.
    """
    return data.chat_sample(enc, [(q.replace('<image>', '').strip(), a) for q, a in turns], n_image_tokens)


def shard_paths(pattern):
    """image_data= : a folder (its .tar files), a glob, or one .tar; sorted. No match is an error that says so."""
    import glob

    paths = sorted(glob.glob(os.path.join(pattern, '*.tar')) if os.path.isdir(pattern) else glob.glob(pattern))
    if not paths:
        raise ValueError(f'image_data={pattern!r} matches no .tar shards (a folder of img2dataset shards, a glob '
                         f'such as data/datacomp/{{00000..00099}}.tar written as "data/datacomp/*.tar", or one file)')
    return paths


def cached_index(path, caption_key, cache_dir):
    """index_shard's byte ranges and skip counts, kept in cache_dir under the shard's path, size and mtime."""
    import hashlib

    st = os.stat(path)
    tag = hashlib.sha1(f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{caption_key}'.encode()).hexdigest()
    cache = os.path.join(cache_dir, f'{tag}.npz')
    if os.path.exists(cache):
        with np.load(cache) as f:
            return f['ranges'], Counter(json.loads(str(f['skipped'])))
    _, ranges, skipped = index_shard(path, caption_key)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{cache}.{os.getpid()}.tmp.npz'
    np.savez(tmp, ranges=ranges, skipped=json.dumps(skipped))
    os.replace(tmp, cache)
    return ranges, skipped


# -----------------------------------------------------------------------------
# the image sources the image and fine-tuning stages read: the shapes world's renders, and real data

class ImageWorld:
    """
    The shapes world's image data, as rendered by prepare_images: the caption scenes and the instruction
    conversations of the train split (fixed sets, so a frozen encoder's features can be cached), and the vision
    eval items of the test split. Captions take the form caption_form names (shapes.CAPTIONS).
    """

    def __init__(self, folder, scene_size, n_captions=8000, n_instruct=6000, n_eval=shapes.EVAL_ITEMS,
                 caption_form='sentences'):
        self.folder, self.scene_size, self.write_caption = folder, scene_size, shapes.CAPTIONS[caption_form]
        self.caption_scenes, self.conversations, self.eval_items = shapes.image_sets(n_captions, n_instruct, n_eval)
        path = shapes.images_path(folder, scene_size, n_captions, n_instruct, n_eval)
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path} is missing: shapes.prepare_images renders it (train.py and eval.py '
                                    f'do so before they read it)')
        self.images = np.load(path, mmap_mode='r')
        self.caption_ids = np.arange(n_captions)
        self.conversation_ids = n_captions + np.arange(n_instruct)
        self.eval_ids = n_captions + n_instruct + np.arange(len(self.eval_items))
        if len(self.images) != len(self.eval_ids) + n_captions + n_instruct:
            raise ValueError(f'{path} does not match the scene lists: delete it to render it again')
        self.skipped = Counter()  # rendered pictures never fail; images.RealImages counts its skips here

    @classmethod
    def rendered(cls, folder, scene_size, n_captions=8000, n_instruct=6000, n_eval=shapes.EVAL_ITEMS, **kw):
        """The world, its pictures rendered first when they are missing (shapes.prepare_images)."""
        shapes.prepare_images(folder, scene_size, n_captions, n_instruct, n_eval)
        return cls(folder, scene_size, n_captions, n_instruct, n_eval, **kw)

    @staticmethod
    def args_of(config):
        """The world arguments (after the folder) of the run whose config (config.json's) is given."""
        return config['scene_size'], config['caption_scenes'], config['conversations']

    # the image source interface that mixture_batch and the fine-tuning rows use (images.RealImages has it too):
    # samples are (tokens, loss mask, image refs), and a ref is an index into self.images
    @property
    def n_captions(self):
        return len(self.caption_ids)

    @property
    def n_conversations(self):
        return len(self.conversation_ids)

    def caption_sample(self, i, enc, n_image_tokens, generator):
        rng = random.Random(data.randint(generator, 2 ** 31))  # a phrasing (or a choice of facts) per draw
        caption = self.write_caption(self.caption_scenes[i], rng)
        return data.caption_sample(enc, caption, n_image_tokens) + ([int(self.caption_ids[i])],)

    def conversation_sample(self, i, enc, n_image_tokens):
        return data.chat_sample(enc, self.conversations[i][1], n_image_tokens) + ([int(self.conversation_ids[i])],)

    def usable(self, ref):
        return True

    def pixels(self, refs):
        return np.asarray(self.images[refs])


class RealImages:
    """
    Real image data behind the image source interface (data.py, above MAX_DRAWS; ImageWorld above has it too), so data.mixture_batch and
    the fine-tuning rows read either: the captions of image_data (img2dataset tar shards, each indexed once into
    cache_dir, then read by random access) and the conversations of instruct_data (a LLaVA json; its image paths are
    relative to instruct_images). Random access rather than streaming keeps a batch a function of its step, as the
    text batches are: a resumed run continues exactly, and each DDP rank reads only the rows it trains on.

    Images are decoded (in the DataLoader workers) when a batch is built, at `size` pixels. One that fails is
    skipped and counted in self.skipped by reason; the trainer reports the counts in its log.
    Refs: caption i is i, conversation i is n_captions + i; None is a blank (white) image.
    """

    def __init__(self, size, image_data=None, caption_key='txt', instruct_data=None, instruct_images=None,
                 cache_dir='data/image_index', verbose=True):
        import time
        from multiprocessing.pool import ThreadPool

        self.size, self.caption_key = size, caption_key
        self.skipped, self.indexing_skipped, self.decoded = Counter(), Counter(), {}
        self.paths, self.starts, self.ranges = [], np.zeros(1, np.int64), np.zeros((0, 4), np.int64)
        if image_data:
            self.paths = shard_paths(image_data)
            t0, parts = time.time(), []
            with ThreadPool(min(8, len(self.paths))) as pool:  # reading headers is I/O: threads are enough
                for n, (ranges, skipped) in enumerate(pool.imap(lambda p: cached_index(p, caption_key, cache_dir),
                                                                self.paths), 1):
                    parts.append(ranges)
                    self.indexing_skipped.update(skipped)
                    if verbose and (n % 100 == 0 or n == len(self.paths)):
                        eta = (time.time() - t0) / n * (len(self.paths) - n)
                        print(f'image_data: indexed {n}/{len(self.paths)} shards, eta {eta:.0f}s', flush=True)
            self.starts = np.cumsum([0] + [len(r) for r in parts])
            self.ranges = np.concatenate(parts)
            if not len(self.ranges):
                raise ValueError(f'image_data={image_data!r}: no shard holds a usable sample '
                                 f'({dict(self.indexing_skipped)})')
        self.conversations = []
        if instruct_data:
            if not os.path.exists(instruct_data):
                raise ValueError(f'instruct_data={instruct_data!r} does not exist')
            self.images_dir = instruct_images or os.path.dirname(os.path.abspath(instruct_data))
            self.conversations, skipped = llava_conversations(instruct_data, self.images_dir)
            self.indexing_skipped.update(skipped)

    def summary(self):
        parts = []
        if self.paths:
            parts.append(f'{self.n_captions:,} image-caption pairs in {len(self.paths)} shards')
        if self.conversations:
            with_image = sum(image is not None for image, _ in self.conversations)
            parts.append(f'{self.n_conversations:,} conversations ({with_image:,} with an image)')
        skipped = ', '.join(f'{k} {v:,}' for k, v in sorted(self.indexing_skipped.items()))
        return '; '.join(parts) + (f'; left out when read: {skipped}' if skipped else '')

    @property
    def n_captions(self):
        return len(self.ranges)

    @property
    def n_conversations(self):
        return len(self.conversations)

    def shard_of(self, i):
        return self.paths[int(np.searchsorted(self.starts, i, side='right')) - 1]

    def caption_sample(self, i, enc, n_image_tokens, generator):
        _, _, at, size = self.ranges[i].tolist()
        text = caption_text(read_range(self.shard_of(i), at, size), self.caption_key)
        return data.caption_sample(enc, text, n_image_tokens) + ([i],)

    def conversation_sample(self, i, enc, n_image_tokens):
        image, turns = self.conversations[i]
        tokens, mask = llava_sample(enc, turns, 0 if image is None else n_image_tokens)
        return tokens, mask, [] if image is None else [self.n_captions + i]

    def raw_image(self, ref):
        if ref < self.n_captions:
            at, size, _, _ = self.ranges[ref].tolist()
            if size > MAX_IMAGE_BYTES:
                raise BadImage('file too large')
            return read_range(self.shard_of(ref), at, size)
        return read_image_file(self.conversations[ref - self.n_captions][0], self.images_dir)

    def usable(self, ref):
        """Decode ref's image (kept for pixels()); False, and the reason counted, when it cannot be used."""
        if ref in self.decoded:
            return True
        try:
            self.decoded[ref] = decode_image(self.raw_image(ref), self.size)
            return True
        except BadImage as e:
            self.skipped[str(e)] += 1
            return False

    def pixels(self, refs):
        """uint8 [len(refs), size, size, 3]: the images of refs, decoded by usable(); forgets them after."""
        blank = np.full((self.size, self.size, 3), 255, np.uint8)
        out = [blank if ref is None else self.decoded[ref] if ref in self.decoded else
               decode_image(self.raw_image(ref), self.size) for ref in refs]
        self.decoded = {}
        return np.stack(out) if out else np.zeros((0, self.size, self.size, 3), np.uint8)
