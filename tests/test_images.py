"""Hostile images and WebDataset shards: each kind converted or skipped and counted, empty data named."""
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import data
from conftest import write_tar
from images import BadImage, MAX_PIXELS, decode_image, read_shard


def encode(img, fmt='PNG', **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_grayscale_becomes_gray_rgb():
    out = decode_image(encode(Image.new('L', (20, 20), 77)), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and (out == 77).all()


def test_rgba_is_composited_on_white():
    a = np.zeros((20, 20, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    out = decode_image(encode(Image.fromarray(a, 'RGBA')), 20)
    assert tuple(out[10, 2]) == (255, 0, 0) and tuple(out[10, 17]) == (255, 255, 255)


def test_palette_with_transparency():
    img = Image.new('P', (20, 20), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.info['transparency'] = 0
    img.paste(0, (0, 0, 20, 10))  # top half: the transparent index
    out = decode_image(encode(img), 20)
    assert tuple(out[15, 10]) == (0, 200, 0) and tuple(out[2, 10]) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    a = np.full((20, 20), 32896, np.uint16)  # 0x8080: half of the 16-bit range
    a[:, :10] = 65535
    img = Image.fromarray(a)
    assert img.mode == 'I;16'  # a 16-bit grayscale PNG
    out = decode_image(encode(img), 20)
    assert tuple(out[10, 2]) == (255, 255, 255) and tuple(out[10, 17]) == (128, 128, 128)


def test_non_square_is_padded_not_cropped():
    out = decode_image(encode(Image.new('RGB', (40, 20), (0, 0, 255))), 20)
    assert tuple(out[10, 10]) == (0, 0, 255) and tuple(out[1, 10]) == (255, 255, 255)  # white bands above, below


def test_one_pixel_image_is_skipped():
    with pytest.raises(BadImage, match='too small'):
        decode_image(encode(Image.new('RGB', (1, 1))), 16)


def huge_png_header(side):
    """A PNG that claims side x side pixels: a decompression bomb is refused from its header alone."""
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    ihdr = struct.pack('>IIBBBBB', side, side, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS ** 0.5) + 1
    with pytest.raises(BadImage, match='too large'):
        decode_image(huge_png_header(side), 16)


def test_truncated_and_garbage_are_skipped():
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), 'JPEG')
    with pytest.raises(BadImage, match='truncated or corrupt'):
        decode_image(jpeg[:len(jpeg) // 2], 16)
    with pytest.raises(BadImage, match='not an image'):
        decode_image(b'<html>not found</html>', 16)


def test_shard_yields_good_samples_and_counts_skips(tmp_path):
    red, blue = encode(Image.new('RGB', (32, 24), (255, 0, 0)), 'JPEG'), encode(Image.new('RGB', (24, 24), (0, 0, 255)))
    path = str(tmp_path / '00000.tar')
    write_tar(path, [
        ('00000/000000000.jpg', red), ('00000/000000000.txt', b'a red square'),
        ('00000/000000000.json', json.dumps({'caption': 'red', 'url': 'x'}).encode()),
        ('00000/000000001.png', b'\x89PNG broken'), ('00000/000000001.txt', b'a corrupt image'),
        ('00000/000000002.png', blue),  # no caption
        ('00000/000000003.png', blue), ('00000/000000003.txt', b'  a blue square\n'),
    ])
    pairs, skipped = read_shard(path, 16)
    assert [(k, c) for k, _, c in pairs] == [('00000/000000000', 'a red square'), ('00000/000000003', 'a blue square')]
    assert pairs[0][1].shape == (16, 16, 3) and pairs[1][1][8, 8].tolist() == [0, 0, 255]
    assert sum(skipped.values()) == 2 and skipped == {'not an image': 1, 'no caption': 1}
    pairs, skipped = read_shard(path, 16, caption_key='caption')  # the caption from a field of the .json
    assert [c for _, _, c in pairs] == ['red'] and skipped == {'no caption': 3}  # only sample 0 has a .json


def test_empty_shard_and_empty_text_split_are_errors_that_name_them(tmp_path):
    path = str(tmp_path / 'empty.tar')
    write_tar(path, [])
    with pytest.raises(ValueError, match=r'empty.tar holds no samples'):
        read_shard(path, 16)
    folder = tmp_path / 'text'
    folder.mkdir()
    (folder / 'val.bin').write_bytes(b'')
    (folder / 'meta.json').write_text(json.dumps({'tokenizer': 'bytes', 'dtype': 'uint16', 'vocab_size': 256,
                                                  'tokens': {'train': 0, 'val': 0}}))
    with pytest.raises(ValueError, match=r'val.bin holds no tokens'):
        data.open_shard(str(folder), 'val')
    assert os.path.exists(folder / 'val.bin')


def test_llava_conversations_mask_all_but_answers(tmp_path):
    import data
    from images import llava_conversations, llava_sample
    records = [
        {'id': '1', 'image': 'coco/1.jpg', 'conversations': [
            {'from': 'human', 'value': '<image>\nWhat is on the table?'}, {'from': 'gpt', 'value': 'A red cup.'},
            {'from': 'human', 'value': 'Is it full?'}, {'from': 'gpt', 'value': 'No.'}]},
        {'id': '2', 'conversations': [{'from': 'human', 'value': 'Say hi.'}, {'from': 'gpt', 'value': 'Hi!'}]},
        {'id': '3', 'image': 'coco/3.jpg', 'conversations': [{'from': 'human', 'value': 'No mark here'},
                                                             {'from': 'gpt', 'value': 'x'}]},
        {'id': '4', 'conversations': [{'from': 'gpt', 'value': 'out of order'}, {'from': 'human', 'value': 'y'}]},
    ]
    path = tmp_path / 'llava.json'
    path.write_text(json.dumps(records))
    kept, skipped = llava_conversations(str(path), '/images')
    assert [k[0] for k in kept] == ['/images/coco/1.jpg', None]
    assert skipped == {'image without one <image> mark': 1, 'turns not human / gpt pairs': 1}
    enc = data.get_tokenizer('bytes')
    tokens, mask = llava_sample(enc, kept[0][1], n_image_tokens=5)
    image = data.special_id(enc, '<|image|>')
    assert tokens[:5] == [image] * 5 and tokens.count(image) == 5  # the image first, wherever <image> stood
    assert tokens[5] == data.special_id(enc, '<|user|>')
    answers = enc.decode([t for t, m in zip(tokens, mask) if m and t < 256])
    assert answers == 'A red cup.No.'  # the loss covers the two answers (and their end tokens), nothing else
    eot = data.special_id(enc, '<|endoftext|>')
    assert [t for t, m in zip(tokens, mask) if m and t >= 256] == [eot, eot]


@pytest.mark.parametrize('question', ['<image>\nWhat color is the cup?', 'What color is the cup?\n<image>'])
def test_a_llava_prompt_and_a_benchmark_prompt_are_the_same_tokens(question):
    """One chat format: what fine-tuning on a LLaVA record shows before the answer is what every benchmark and
    sample.py ask with (data.question_prompt), for the same question and image."""
    import data
    from images import llava_sample
    enc = data.get_tokenizer('bytes')
    tokens, mask = llava_sample(enc, [(question, 'red')], n_image_tokens=7)
    prompt = tokens[:mask.index(True)]
    assert prompt == data.question_prompt(enc, 'What color is the cup?', 7)
    assert enc.decode(tokens[len(prompt):-1]) == 'red'


def test_an_empty_or_nul_image_name_is_a_counted_reason_not_a_crash(tmp_path):
    from images import BadImage, read_image_file
    with pytest.raises(BadImage, match='not a regular file'):
        read_image_file(os.path.join(str(tmp_path), ''), str(tmp_path))  # "image": "" names the folder itself
    with pytest.raises(BadImage, match='unusable file name'):
        read_image_file(os.path.join(str(tmp_path), 'a\x00.jpg'), str(tmp_path))
